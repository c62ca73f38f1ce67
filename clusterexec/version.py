"""The version of clusterexec, apart from everything else so that any module may name it without importing the
package (whose __init__ imports the executor, and with it most of the package)."""

__version__ = "0.1.0"
