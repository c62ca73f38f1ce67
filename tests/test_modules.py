"""modules=: the user's own code travels by value, so workers need no copy of it."""

from __future__ import annotations

import textwrap

import cloudpickle
import pytest
from conftest import private_package as make_package

from clusterexec import SerializationError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def private_package(tmp_path, monkeypatch):
    """A package importable here but not on the worker node."""
    with make_package(tmp_path, monkeypatch, "labcode_x7", {
        "__init__.py": textwrap.dedent("""
            from .physics import energy

            SCALE = 10

            def simulate(x):
                return energy(x) * SCALE
        """),
        "physics.py": "def energy(x):\n    return x * x\n",
    }) as module:
        yield module


def test_without_modules_the_error_names_the_module_and_the_fix(cluster, private_package):
    with cluster.executor() as ex:
        with pytest.raises(SerializationError) as info:
            ex.submit(private_package.simulate, 3).result(timeout=30)
    message = str(info.value)
    assert "labcode_x7" in message and "modules=[labcode_x7]" in message, message
    assert info.value.phase == "unpickling the function"


def test_an_import_inside_a_task_gets_the_same_hint(cluster, private_package):
    def imports_it():
        import labcode_x7  # noqa: F401

    with cluster.executor() as ex:
        with pytest.raises(ModuleNotFoundError) as info:
            ex.submit(imports_it).result(timeout=30)
    assert any("modules=[labcode_x7]" in note for note in getattr(info.value, "__notes__", [])), info.value


def test_modules_sends_the_package_by_value(cluster, private_package):
    with cluster.executor(modules=[private_package]) as ex:
        assert list(ex.map(private_package.simulate, range(5))) == [0, 10, 40, 90, 160]
        # Submodules and classes come along, and so does a lambda that uses them.
        assert ex.submit(lambda: private_package.physics.energy(7)).result(timeout=30) == 49
    # Registration ends with the executor (unless the user registered the module themselves).
    assert "labcode_x7" not in cloudpickle.list_registry_pickle_by_value()


def test_modules_accepts_names_and_rejects_other_things(cluster, private_package):
    with cluster.executor(modules=["labcode_x7"]) as ex:
        assert ex.submit(private_package.simulate, 2).result(timeout=30) == 40
    with pytest.raises(TypeError, match="modules="):
        cluster.executor(modules=[42])
    with pytest.raises(ModuleNotFoundError):
        cluster.executor(modules=["no_such_module_q9"])


def test_an_import_of_a_module_sent_by_value_does_not_suggest_sending_it(cluster, private_package):
    def imports_it():
        import labcode_x7.physics  # noqa: F401

    with cluster.executor(modules=[private_package]) as ex:
        assert ex.submit(private_package.simulate, 2).result(timeout=30) == 40
        with pytest.raises(ModuleNotFoundError) as info:
            ex.submit(imports_it).result(timeout=30)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "send it with the tasks" not in notes, notes
    assert "It is sent with the tasks (modules=[labcode_x7])" in notes, notes
    assert "an import statement run in a task still needs it installed" in notes, notes
