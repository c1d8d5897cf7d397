"""sidecar/sidecar.example.toml (the README's example) loads with the sidecar's own settings loader."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sidecar.settings import SidecarConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "sidecar" / "sidecar.example.toml"


def test_the_example_config_loads_and_says_what_it_shows():
    cfg = load_config(EXAMPLE, env={})
    assert cfg.appkey == "CuKPvJQR7enquqrZ"
    assert cfg.upstream.urls == ("https://keys-1.internal:8443", "https://keys-2.internal:8443")
    assert (cfg.upstream.cert, cfg.upstream.key) == ("/etc/skm/host.pem", "/etc/skm/host-key.pem")
    # Every value it gives without "example" beside it is the default, as its header says.
    text = EXAMPLE.read_text()
    default = SidecarConfig()
    for section in ("upstream", "listen", "cache", "events", "attest", "reads", "acks"):
        for f in dataclasses.fields(getattr(default, section)):
            line = next((ln for ln in text.splitlines() if ln.startswith(f"{f.name} = ")), None)
            if line is not None and "# example" not in line:
                assert getattr(getattr(cfg, section), f.name) == getattr(getattr(default, section), f.name), line


def test_the_environment_overrides_the_example():
    cfg = load_config(EXAMPLE, env={"SKM_SIDECAR_UPSTREAM_URLS": "https://keyserver:8443",
                                    "SKM_SIDECAR_CACHE_TTL": "5"})
    assert cfg.upstream.urls == ("https://keyserver:8443",) and cfg.cache.ttl == 5.0
