"""``rtws serve-ray``: the flags and the entry point. Imports Ray only when the command runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

RAY_FLAGS: dict[str, tuple[type, str]] = {
    "replicas": (int, "replicas to start (one engine each); the initial count when autoscaling"),
    "min_replicas": (int, "autoscale down to this many (turns autoscaling on)"),
    "max_replicas": (int, "autoscale up to this many (turns autoscaling on when above --replicas)"),
    "target_live_generations": (float, "autoscaling target: live generations per replica (default: 3/4 of num_slots)"),
    "num_cpus": (float, "CPUs Ray reserves per replica (default 1)"),
    "num_gpus": (float, "GPUs per replica (default: 1 where CUDA is used, else 0)"),
}


def add_flags(p: argparse.ArgumentParser) -> None:
    """The Ray options (``RayOptions`` fields) and ``--ray-address``; ServerConfig flags are added by the caller."""
    g = p.add_argument_group("Ray Serve")
    for name, (tp, help_text) in RAY_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), dest="ray_" + name, type=tp, default=argparse.SUPPRESS,
                       metavar=name.upper(), help=help_text)
    g.add_argument("--ingress", dest="ray_ingress", choices=("auto", "proxy", "haproxy"), default="auto",
                   help="what carries traffic to the replicas: Serve's proxy (rtws's router: affinity, least-loaded "
                        "placement), Serve's HAProxy ingress (each replica serves its own sockets; about the cost of "
                        "serving directly), or auto: HAProxy for one fixed replica on a local cluster, else proxy "
                        "(docs/scale-out.md)")
    g.add_argument("--ray-address", dest="ray_address", default=None,
                   help="join this Ray cluster ('auto' or host:port); default: start a local one")


def main(args: argparse.Namespace, explicit: dict[str, Any]) -> int:
    """Run ``rtws serve-ray`` with ServerConfig values ``explicit`` (flags) and the parsed Ray flags."""
    try:
        from .config import ServerConfig

        config = ServerConfig.from_sources(explicit)
        from . import ray_env

        loopback = config.host.startswith("127.") or config.host in ("localhost", "::1")
        shape = {k: getattr(args, "ray_" + k) for k in RAY_FLAGS if hasattr(args, "ray_" + k)}
        replicas = shape.get("replicas", 1)
        local = args.ray_address is None
        ingress = ray_env.resolve_ingress(
            args.ray_ingress, replicas=replicas, local=local,
            autoscales=ray_env.autoscaling(replicas, shape.get("min_replicas"), shape.get("max_replicas")),
            haproxy_available=args.ray_ingress != "auto" or ray_env.haproxy_available())
        # Before the first `import ray`: Ray reads the loopback switch, and Serve its ingress flags, at import.
        # On a cluster rtws did not start, the nodes' environment decides the ingress (checked at deploy).
        ray_env.apply(loopback=loopback and local, ingress=ingress if local else "proxy")
        from .ray import RayOptions

        options = RayOptions(**shape, ingress=ingress if local else args.ray_ingress)
    except ImportError as exc:
        print(f"rtws serve-ray: Ray Serve is not installed ({exc}); pip install 'rtws[ray]'", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rtws serve-ray: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the HAProxy ingress without an HAProxy binary
        print(f"rtws serve-ray: {exc}", file=sys.stderr)
        return 2
    from .ray import serve_ray

    return serve_ray(config, options, address=args.ray_address)
