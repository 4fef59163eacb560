"""rtws.ray_env: the ingress choice and the environment it sets (pure; Ray is not imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rtws import ray_env


def test_auto_ingress_is_haproxy_only_for_one_fixed_replica_on_a_local_cluster() -> None:
    assert ray_env.resolve_ingress("auto", replicas=1, autoscales=False, local=True) == "haproxy"
    assert ray_env.resolve_ingress("auto", replicas=2, autoscales=False, local=True) == "proxy"
    assert ray_env.resolve_ingress("auto", replicas=1, autoscales=True, local=True) == "proxy"
    assert ray_env.resolve_ingress("auto", replicas=1, autoscales=False, local=False) == "proxy"
    assert ray_env.resolve_ingress("auto", replicas=1, autoscales=False, local=True,
                                   haproxy_available=False) == "proxy"  # no binary (not Linux): Serve's proxy
    assert ray_env.resolve_ingress("proxy", replicas=1, autoscales=False, local=True) == "proxy"
    assert ray_env.resolve_ingress("haproxy", replicas=4, autoscales=True, local=False) == "haproxy"
    with pytest.raises(ValueError, match="ingress"):
        ray_env.resolve_ingress("nginx", replicas=1, autoscales=False, local=True)
    assert ray_env.autoscaling(1, None, None) is False
    assert ray_env.autoscaling(1, None, 1) is False
    assert ray_env.autoscaling(1, None, 3) is True
    assert ray_env.autoscaling(2, 0, None) is True


def test_haproxy_environment(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    ray_env.apply(loopback=False, environ=env, ingress="haproxy")
    assert ray_env.haproxy_ingress(env)
    assert int(env["RAY_SERVE_HAPROXY_NBTHREAD"]) >= 1
    assert ray_env.HAPROXY_BINARY_ENV not in env  # not on loopback: Serve's own binary and binds
    proxy: dict[str, str] = {}
    ray_env.apply(loopback=True, environ=proxy)
    assert not ray_env.haproxy_ingress(proxy) and ray_env.HAPROXY_BINARY_ENV not in proxy
    kept = {ray_env.DIRECT_INGRESS_ENV: "0"}
    ray_env.apply(loopback=False, environ=kept, ingress="haproxy")
    assert not ray_env.haproxy_ingress(kept)  # a value the operator set is kept


def test_loopback_wrapper_rewrites_every_bind_and_runs_the_real_binary(tmp_path: Path) -> None:
    """The wrapper HAProxy's manager runs on a loopback node: Serve's template binds its Prometheus and stats
    frontends on all interfaces; the wrapper hands the real binary a copy with every bind on 127.0.0.1."""
    real = tmp_path / "real-haproxy"
    real.write_text(f"#!{sys.executable}\nimport sys\nprint(repr(sys.argv[1:]))\n"
                    "print(open(sys.argv[sys.argv.index('-f') + 1]).read())\n")
    real.chmod(0o755)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend prometheus\n    bind :9101\nfrontend http_frontend\n    bind 127.0.0.1:8000\n"
                   "listen stats\n  bind *:8404\n  bind 0.0.0.0:1\n  bind [::]:2\n")
    wrapper = ray_env.loopback_haproxy(str(real))
    out = subprocess.run([wrapper, "-db", "-f", str(cfg), "-sf", "123"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f"'-f', '{cfg}.loopback', '-sf', '123'" in out
    binds = [ln.split()[1] for ln in out.splitlines() if ln.strip().startswith("bind ")]
    assert binds == ["127.0.0.1:9101", "127.0.0.1:8000", "127.0.0.1:8404", "127.0.0.1:1", "127.0.0.1:2"], out
    assert "bind :9101" in cfg.read_text()  # Serve's own file is left as written
    assert Path(wrapper).stat().st_mode & 0o077 == 0 and Path(wrapper).parent.stat().st_mode & 0o077 == 0
