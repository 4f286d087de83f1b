"""A node of a multi-node Ray cluster is lost: what happens to its streams, measured.

    python benchmarks/fleet_node_loss.py [--image-size 128]

Starts a Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``: a
head with no CPUs for actors and two worker nodes of one CPU each, each node its own
raylet and object store, as on separate machines) and a fleet of two looping streams,
one actor each, so each worker node runs one stream.  Then it removes the node that runs
stream ``a``: its raylet and processes are killed, as when a machine goes away.  With
no free CPU left the actor cannot restart (Ray waits for resources), so after a pause a
new node joins, and Ray restarts the actor there.  Prints when each step happened, how
long ``a`` was dark, whether it came back with its object ids and on which node, and
whether stream ``b`` went on undisturbed.  Needs the ``fleet`` extra (``ray``).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import options  # benchmarks/options.py
import yaml

from streamtrack.fleet import Fleet
from streamtrack.fleet_directory import read_directory
from streamtrack.fleet_spec import load_fleet
from streamtrack.models import save_random_checkpoint
from streamtrack.subscriber import Subscriber
from streamtrack.synthetic import make_clip, write_video


def write_two_stream_fleet(tmp: Path, image_size: int, boxes: list[list[int]], **fleet) -> Path:
    """``tmp``/fleet.yaml: streams ``a`` and ``b`` looping one synthetic clip in real time,
    each prompted with ``boxes`` (objects 1, 2 ...), one actor each (``fleet`` adds
    options), with a random tiny checkpoint.  Returns the directory file's path."""
    checkpoint = save_random_checkpoint("sam2.1_hiera_tiny", tmp / "tiny.pt")
    clip = write_video(make_clip(24, 160, 120, num_objects=2, seed=1).frames, tmp / "clip.mp4", fps=15)
    directory = tmp / "fleet.json"
    doc = {
        "fleet": {"directory": str(directory), "num_cpus": 1, "streams_per_actor": 1, "max_restarts": 3,
                  **fleet},
        "defaults": {"checkpoint": str(checkpoint), "image_size": image_size, "device": "cpu"},
        "streams": [{"name": name, "source": str(clip), "loop": True, "realtime": True,
                     "prompts": [{"obj_id": i, "box": box} for i, box in enumerate(boxes, start=1)]}
                    for name in ("a", "b")],
    }
    (tmp / "fleet.yaml").write_text(yaml.safe_dump(doc))
    return directory


def wait(what: str, check, timeout: float = 180.0, every: float = 0.2):
    """``check()``'s first true value, polled every ``every`` s; exits the benchmark on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def entries(directory: Path) -> dict:
    """The fleet directory's streams, or {} while it is not written yet."""
    try:
        return read_directory(directory)
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=options.image_size, default=128)
    ap.add_argument("--pause", type=options.seconds(0), default=5.0,
                    help="seconds between the loss and the new node")
    args = ap.parse_args(argv)

    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="streamtrack-node-loss-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~150 MB of checkpoint
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    log(f"cluster up: head (0 CPUs for actors) + 2 worker nodes of 1 CPU, address {cluster.address}")
    directory = write_two_stream_fleet(tmp, args.image_size, [[10, 10, 60, 60], [70, 40, 130, 100]],
                                       address=cluster.address, control=None)
    fleet = Fleet(load_fleet(tmp / "fleet.yaml"), log_level=logging.WARNING, poll_interval=0.3)
    runner = threading.Thread(target=fleet.run, daemon=True)
    runner.start()
    try:
        running = wait("both streams running", lambda: (e := entries(directory)) and all(
            e.get(n) is not None and e[n].state == "running" for n in ("a", "b")) and e)
        a, b = running["a"], running["b"]
        log(f"streams running: a on actor {a.actor} (pid {a.actor_pid}), b on {b.actor} (pid {b.actor_pid})")
        node_of_a = next(w for w in workers if _runs_pid(w, a.actor_pid))
        with Subscriber.from_fleet(str(directory)) as sub:
            last_a = _next(sub, "a")
            last_b = _next(sub, "b")
            log(f"a publishing (seq {last_a.seq}, objects {[o.obj_id for o in last_a.objects]}); "
                f"b publishing (seq {last_b.seq})")
            lost_at = time.monotonic()
            cluster.remove_node(node_of_a, allow_graceful=False)
            log("removed the node that ran a (raylet and its processes killed)")
            b_during = _next(sub, "b", last_b.seq, timeout=30)
            log(f"b still publishing while a is down (seq {b_during.seq})")
            time.sleep(args.pause)
            state = entries(directory).get("a")
            log(f"after {args.pause:g} s without a free CPU, a is {state.state if state else '?'}")
            # Its old actor is long dead now: everything it published has arrived.
            last_a = sub.latest("a")
            cluster.add_node(num_cpus=1)
            log("a new node joined")
            back = _next(sub, "a", last_a.seq, timeout=180)
            dark = time.monotonic() - lost_at
            entry = entries(directory)["a"]
            log(f"a published again: seq {back.seq} (last before the loss {last_a.seq}), objects "
                f"{[o.obj_id for o in back.objects]}, areas {[o.area for o in back.objects]}; actor pid "
                f"{entry.actor_pid} (was {a.actor_pid}), restarts {entry.restarts}")
            log(f"a was dark for {dark:.1f} s, {args.pause:g} s of it waiting for a node to join")
            b_after = _next(sub, "b", b_during.seq, timeout=30)
            log(f"b: seq {b_after.seq}, restarts {entries(directory)['b'].restarts}")
    finally:
        import ray

        fleet.stop()
        runner.join(60)
        ray.shutdown()  # the driver's connection first: the cluster will not remove its head under it
        cluster.shutdown()


def _runs_pid(node, pid: int) -> bool:
    """Whether ``pid`` descends from ``node``'s raylet (Linux: parents from /proc)."""
    raylet = node.all_processes["raylet"][0].process.pid
    while pid > 1:
        if pid == raylet:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


def _next(sub: Subscriber, stream: str, after_seq: int = -1, timeout: float = 60.0):
    msg = sub.latest(stream, timeout=timeout, after_seq=after_seq)
    if msg is None:
        raise SystemExit(f"no masks from {stream!r} after seq {after_seq} within {timeout:g} s")
    return msg


if __name__ == "__main__":
    main()
