import sys
import textwrap
from pathlib import Path

import pytest

import iris
from irishost.config import ConfigError, load_config
from irishost.loader import HandlerImportError, load_handler

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch):
    """Undo what loading a handler does to the interpreter, so tests cannot see each
    other's modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def make_app(directory: Path, handler: str, modules: dict[str, str], path: str = '["lib"]'):
    """A config in ``directory`` whose handler modules live in ``directory/lib``."""
    for name, source in modules.items():
        module = directory / "lib" / f"{name}.py"
        module.parent.mkdir(parents=True, exist_ok=True)
        module.write_text(textwrap.dedent(source))
    config = directory / "service.toml"
    config.write_text(f'[service]\ncluster = "c"\nhandler = "{handler}"\npath = {path}\n')
    return load_config(config)


GREETER = """
    import iris

    class Greeter(iris.ServiceHandler):
        def handle_request(self, request):
            return b"hello " + request

        class Inner(iris.ServiceHandler):
            pass

    NOT_A_CLASS = 42

    class Unrelated:
        pass
"""


def test_loads_handler_from_path_relative_to_config(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    config = make_app(tmp_path / "app", "greeter:Greeter", {"greeter": GREETER})

    handler = load_handler(config)

    assert issubclass(handler, iris.ServiceHandler)
    assert handler().handle_request(b"you") == b"hello you"
    assert sys.path[0] == str(tmp_path / "app" / "lib")


def test_loading_twice_does_not_grow_sys_path(tmp_path):
    config = make_app(tmp_path, "greeter:Greeter", {"greeter": GREETER})

    first = load_handler(config)
    path = list(sys.path)

    assert load_handler(config) is first
    assert sys.path == path


def test_dotted_attribute(tmp_path):
    config = make_app(tmp_path, "greeter:Greeter.Inner", {"greeter": GREETER})

    assert load_handler(config).__qualname__ == "Greeter.Inner"


def test_handler_in_a_package(tmp_path):
    modules = {"pkg/__init__": "", "pkg/greeter": GREETER}
    config = make_app(tmp_path, "pkg.greeter:Greeter", modules)

    assert load_handler(config).__name__ == "Greeter"


def load_error(config) -> HandlerImportError:
    with pytest.raises(HandlerImportError) as info:
        load_handler(config)
    return info.value


def test_missing_module(tmp_path):
    config = make_app(tmp_path, "nowhere:Handler", {})

    error = load_error(config)

    assert str(error) == (
        f'{tmp_path / "service.toml"}: handler "nowhere:Handler": '
        f"no module named 'nowhere' in service.path ({tmp_path / 'lib'})"
    )
    assert isinstance(error.__cause__, ModuleNotFoundError)
    assert error.details == ""


def test_module_raising_at_import_keeps_its_traceback(tmp_path):
    broken = """
        def connect_to_database():
            raise RuntimeError("database is down")

        connect_to_database()
    """
    config = make_app(tmp_path, "broken:Handler", {"broken": broken})

    error = load_error(config)

    assert str(error) == (
        f'{tmp_path / "service.toml"}: handler "broken:Handler": '
        "importing 'broken' raised RuntimeError: database is down"
    )
    assert isinstance(error.__cause__, RuntimeError)
    assert error.details.startswith("Traceback (most recent call last):")
    assert str(tmp_path / "lib" / "broken.py") in error.details
    assert "connect_to_database" in error.details
    assert error.details.endswith("RuntimeError: database is down\n")


def test_missing_dependency_of_the_module_keeps_its_traceback(tmp_path):
    config = make_app(tmp_path, "needy:Handler", {"needy": "import not_installed_anywhere\n"})

    error = load_error(config)

    assert str(error).endswith("importing 'needy' failed: No module named 'not_installed_anywhere'")
    assert str(tmp_path / "lib" / "needy.py") in error.details


def test_module_exiting_at_import(tmp_path):
    config = make_app(tmp_path, "quitter:Handler", {"quitter": "import sys\nsys.exit(2)\n"})

    error = load_error(config)

    assert str(error).endswith("importing 'quitter' raised SystemExit: 2")
    assert "sys.exit(2)" in error.details


@pytest.mark.parametrize(
    ("attribute", "missing"), [("Greeter2", "Greeter2"), ("Greeter.Outer", "Greeter.Outer")]
)
def test_missing_attribute(tmp_path, attribute, missing):
    config = make_app(tmp_path, f"greeter:{attribute}", {"greeter": GREETER})

    error = load_error(config)

    assert str(error) == (
        f"{tmp_path / 'service.toml'}: handler \"greeter:{attribute}\": module 'greeter' "
        f"({tmp_path / 'lib' / 'greeter.py'}) has no attribute '{missing}'"
    )
    assert isinstance(error.__cause__, AttributeError)


@pytest.mark.parametrize(
    ("attribute", "shown"),
    [("NOT_A_CLASS", "42"), ("Unrelated", "<class 'greeter.Unrelated'>")],
)
def test_attribute_that_is_not_a_service_handler(tmp_path, attribute, shown):
    config = make_app(tmp_path, f"greeter:{attribute}", {"greeter": GREETER})

    error = load_error(config)

    assert str(error).endswith(f"'{attribute}' is {shown}, not a subclass of iris.ServiceHandler")


def test_example_handlers():
    echo = load_handler(load_config(CONFIGS / "echo.toml"))
    primes = load_handler(load_config(CONFIGS / "primes.toml"))

    assert echo().handle_request(b"ping") == b"ping"
    assert primes().handle_request(b"100") == b"25"
    assert primes().handle_request(b"2") == b"0"


SETTINGS_HANDLERS = """
    import iris

    class Anything(iris.ServiceHandler):
        def __init__(self, limit, **more):
            self.settings = {"limit": limit, **more}

    class PositionalOnly(iris.ServiceHandler):
        def __init__(self, limit, /):
            self.limit = limit
"""


def settings_app(tmp_path, handler: str, settings: str):
    config = make_app(tmp_path, f"tuned:{handler}", {"tuned": SETTINGS_HANDLERS})
    config.file.write_text(config.file.read_text() + f"[settings]\n{settings}\n")
    return load_config(config.file)


def test_a_handler_taking_any_keyword_accepts_every_setting(tmp_path):
    config = settings_app(tmp_path, "Anything", "limit = 5\ncolour = 'red'")

    handler = load_handler(config)(**config.settings)

    assert handler.settings == {"limit": 5, "colour": "red"}


def test_a_setting_that_can_only_be_positional_is_refused_by_name(tmp_path):
    config = settings_app(tmp_path, "PositionalOnly", "limit = 5")

    with pytest.raises(ConfigError) as caught:
        load_handler(config)

    assert caught.value.key == "settings.limit"
    assert caught.value.problem == (
        "not a keyword argument of the handler class "
        "(the handler is tuned:PositionalOnly(limit, /))"
    )
