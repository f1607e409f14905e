"""A real Prometheus server for the tests: Debian's ``prometheus`` as a plain process on a free
localhost port, its data in a temporary folder, and its HTTP API (``/api/v1/...``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from servekit import free_port, stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "ctpipe-alerts.yml"
EXAMPLE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
INSTALL = "apt-get install -y prometheus"


def tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``, or a skip that says how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: {INSTALL}")
    return path


def quick_rules(out: Path, wait: str = "1s") -> Path:
    """The alert rules with every ``for:`` shortened to ``wait``, so that a test sees an alert
    fire in seconds (promtool's unit tests check the real waits)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = wait
    out.write_text(yaml.safe_dump(rules, sort_keys=False))
    return out


class Prometheus:
    """``prometheus`` with the example config (deploy/prometheus/prometheus.yml) scraping
    ``targets`` every second with ``token``, and evaluating ``rules`` every second."""

    def __init__(self, folder: Path, targets: list[str], token: str, rules: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(rules)]
        (scrape,) = config["scrape_configs"]
        (folder / "token").write_text(token)
        scrape["authorization"]["credentials_file"] = str(folder / "token")
        scrape["static_configs"] = [{"targets": targets}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=open(folder / "prometheus.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self.ready, 60, "prometheus to be ready")
        except AssertionError:
            self.stop()
            raise

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}")
        return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def api(self, path: str, **params) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar) of ``expr`` now, as a list of samples."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def alerts(self, name: str, state: str | None = None) -> list[dict]:
        """Active alerts called ``name`` (pending and firing, or only ``state``)."""
        return [
            a
            for a in self.api("alerts")["alerts"]
            if a["labels"]["alertname"] == name and state in (None, a["state"])
        ]

    def stop(self) -> None:
        stop(self.process)
