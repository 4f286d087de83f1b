"""A fleet on a Ray cluster of separate network hosts, and the loss of one of them, measured.

    sudo python benchmarks/fleet_netns_cluster.py [--image-size 128] [--fast-detection]

Linux only, as root, with iproute2 (``ip``): it builds the hosts out of network
namespaces on this machine.  Each has its own network stack and address on a private
bridge (198.18.0.0/24, the range set aside for network benchmarks; the bridge reaches
nothing outside the namespaces):

* ``head`` 198.18.0.1: ``ray start --head`` (no CPUs for actors) and ``streamtrack fleet``;
* ``w1``-``w3`` 198.18.0.2-4: ``ray start --address`` with one CPU each; two run the
  streams, one is spare capacity;
* ``client`` 198.18.0.9: ``streamtrack subscribe --fleet`` on the fleet's control
  endpoint, so it learns the streams' endpoints over the network alone.

The commands are the ones docs/scaling.md gives for a multi-node cluster (token
authentication, ``fleet.bind: 0.0.0.0``). Two looping streams run, one actor each.
Then the script cuts the network link of the host running stream ``a``, as when a
machine loses power or its cable: no connection is closed and nobody is told. It
prints when Ray declared the node dead, when ``a`` ran again on the spare host and
when the client got its masks again (with which object ids, from which address), and
whether ``b`` went on undisturbed (and when the fleet's directory listed ``a`` as
unreachable). From inside the cut-off host it probes ``a``'s old endpoint to see when
the tracker there stopped (fencing: an actor the driver has not polled for
``fleet.fence_after`` seconds stops its streams), and so whether two copies of ``a``
ran at once. Last it mends the link and times how long the old actor process lived on.

``--fast-detection`` starts the head with shorter health checks (1 s period, 1 s
timeout, 3 misses) instead of Ray's defaults (3 s, 10 s, 5 misses).  The namespaces
share this machine's file system and process table, as a cluster with a shared file
system would; what they do not share is the network.  Needs the ``fleet`` extra.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import options  # this folder: run as a script
from fleet_node_loss import entries, wait, write_two_stream_fleet

PREFIX = "stk"  # namespace and interface names: stk-head, stk-w1, ... (and stk-lan, the bridge's)
NET = "198.18.0"
HOSTS = {"head": 1, "w1": 2, "w2": 3, "w3": 4, "client": 9}
RAY_PORT = 6379
FAST_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                  "RAY_health_check_failure_threshold": "3"}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def netns(host: str) -> str:
    return f"{PREFIX}-{host}"


def address(host: str) -> str:
    return f"{NET}.{HOSTS[host]}"


def build_network() -> None:
    """A bridge in a namespace of its own, and one namespace per host wired to it."""
    lan = netns("lan")
    sh("ip", "netns", "add", lan)
    sh("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", lan, "link", "set", "br0", "up")
    for host in HOSTS:
        ns, port = netns(host), f"{PREFIX}-{host}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", port, "netns", lan, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", lan, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address(host)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def tear_down_network() -> None:
    """Kill whatever runs in the namespaces (Ray leaves daemons behind), then remove them."""
    names = [netns(h) for h in HOSTS] + [netns("lan")]
    for ns in names:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.5)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def in_host(host: str, *cmd: str, env: dict[str, str] | None = None) -> list[str]:
    """``cmd`` run on ``host``: in its namespace, with ``env`` added to the environment."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return ["ip", "netns", "exec", netns(host), "env", *extra, *cmd]


@dataclass
class Received:
    """What the client host printed: one masks message per entry."""

    lines: list[tuple[float, str, int, list[int]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, stdout) -> None:
        for line in stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("topic", "").startswith("masks/"):
                with self.lock:
                    self.lines.append((time.monotonic(), msg["stream"], msg["seq"],
                                       [o["obj_id"] for o in msg["objects"]]))

    def of(self, stream: str, since: float = 0.0) -> list[tuple[float, str, int, list[int]]]:
        with self.lock:
            return [x for x in self.lines if x[1] == stream and x[0] >= since]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the teardown, as Ctrl-C does


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=options.image_size, default=128)
    ap.add_argument("--fast-detection", action="store_true",
                    help="shorter Ray health checks on the head (1 s period, 1 s timeout, 3 misses)")
    ap.add_argument("--fence-after", type=options.seconds(0, above=True), default=30.0,
                    help="fleet.fence_after: seconds without the driver before an actor stops its streams")
    args = ap.parse_args(argv)
    # `timeout` and `kill` send SIGTERM: without this the cluster and the namespaces stayed.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("ip"):
        raise SystemExit("fleet_netns_cluster: needs Linux, root and iproute2 (network namespaces)")
    ray_cli = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if ray_cli is None:
        raise SystemExit("fleet_netns_cluster: needs Ray (pip install -e '.[fleet]')")

    tmp = Path(tempfile.mkdtemp(prefix="streamtrack-netns-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~150 MB of checkpoint
    directory = write_two_stream_fleet(tmp, args.image_size, [[25, 30, 55, 54], [100, 65, 124, 91]],
                                       address=f"{address('head')}:{RAY_PORT}", bind="0.0.0.0",
                                       fence_after=args.fence_after)
    env = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    procs: list[subprocess.Popen] = []
    tear_down_network()  # leftovers of an interrupted run
    try:
        build_network()  # in the try: a network half built is torn down too
        head_env = {**env, **(FAST_DETECTION if args.fast_detection else {})}
        sh(*in_host("head", ray_cli, "start", "--head", "--node-ip-address", address("head"),
                    "--port", str(RAY_PORT), "--num-cpus", "0", "--temp-dir", str(tmp / "r-head"),
                    env=head_env))
        for host in ("w1", "w2", "w3"):
            sh(*in_host(host, ray_cli, "start", "--address", f"{address('head')}:{RAY_PORT}",
                        "--node-ip-address", address(host), "--num-cpus", "1",
                        "--temp-dir", str(tmp / f"r-{host}"), env=env))
        log(f"Ray cluster up: head {address('head')} (no CPUs for actors), workers "
            f"{', '.join(address(h) for h in ('w1', 'w2', 'w3'))} (1 CPU each); "
            f"health checks {'fast' if args.fast_detection else 'Ray defaults'}")
        driver_log = (tmp / "driver.log").open("w")
        driver = subprocess.Popen(
            in_host("head", sys.executable, "-m", "streamtrack", "fleet", str(tmp / "fleet.yaml"), env=env),
            stdout=driver_log, stderr=subprocess.STDOUT)
        procs.append(driver)
        running = wait("both streams running", lambda: (e := entries(directory)) and all(
            n in e and e[n].state == "running" for n in ("a", "b")) and e)
        control = json.loads(directory.read_text())["fleet"]["control"]
        for name, e in sorted(running.items()):
            log(f"stream {name}: node {e.node}, publish {e.publish}, actor pid {e.actor_pid}")
        log(f"fleet control (as listed): {control}")

        received = Received()
        client = subprocess.Popen(
            in_host("client", sys.executable, "-m", "streamtrack", "subscribe", "--fleet", control,
                    "--topics", "masks/", env=env),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(client)
        threading.Thread(target=received.read, args=(client.stdout,), daemon=True).start()
        wait("the client host receiving both streams", lambda: received.of("a") and received.of("b"))
        log(f"client {address('client')} receiving a and b (it was given only the fleet control endpoint)")

        a = running["a"]
        cut = next(h for h in ("w1", "w2", "w3") if address(h) == a.node)
        # A subscriber inside the host to be cut off still reaches a's old tracker there.
        inside = Received()
        probe = subprocess.Popen(
            in_host(cut, sys.executable, "-m", "streamtrack", "subscribe", a.publish, "--topics", "masks/",
                    env=env),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(probe)
        threading.Thread(target=inside.read, args=(probe.stdout,), daemon=True).start()
        wait("the probe inside the host receiving a", lambda: inside.of("a"))
        time.sleep(3)
        cut_at = time.monotonic()
        sh("ip", "-n", netns(cut), "link", "set", "eth0", "down")
        log(f"cut the network link of {cut} ({a.node}), which runs stream a")
        unreachable = wait("the fleet to list a unreachable", lambda: (e := entries(directory).get("a"))
                           and e.state != "running" and time.monotonic(), timeout=300)
        log(f"a is {entries(directory)['a'].state} ({unreachable - cut_at:.1f} s after the cut)")
        detected = wait("Ray to declare the node dead", lambda: (e := entries(directory).get("a"))
                        and e.state not in ("running", "unreachable") and time.monotonic(), timeout=300)
        log(f"a is {entries(directory)['a'].state}: Ray declared {a.node} dead ({detected - cut_at:.1f} s "
            f"after the cut)")
        moved = wait("a running on another node", lambda: (e := entries(directory).get("a"))
                     and e.state == "running" and e.node != a.node and (time.monotonic(), e), timeout=300)
        log(f"a running again on {moved[1].node} ({moved[0] - cut_at:.1f} s after the cut), "
            f"publish {moved[1].publish}, restarts {moved[1].restarts}")
        # After the fleet saw a's actor gone, a's masks can only come from its new tracker.
        back = wait("the client receiving a again", lambda: received.of("a", since=detected)[:1],
                    timeout=120)[0]
        before = received.of("a")
        last_before = max((x for x in before if x[0] < cut_at), key=lambda x: x[0])
        log(f"client got a again {back[0] - cut_at:.1f} s after the cut: seq {back[2]} (last before the "
            f"cut {last_before[2]}), objects {back[3]}")
        b_during = [x for x in received.of("b") if cut_at <= x[0] <= back[0]]
        gaps = [later[0] - earlier[0] for earlier, later in zip(b_during, b_during[1:], strict=False)]
        b_entry = entries(directory)["b"]
        log(f"b during the outage: {len(b_during)} messages, longest gap {max(gaps, default=0):.2f} s, "
            f"restarts {b_entry.restarts}, node {b_entry.node}")

        # Silent for 5 s: the old tracker has stopped (or the run gives up after fence_after + 60 s).
        wait("a's old tracker to stop", lambda: time.monotonic() - inside.of("a")[-1][0] > 5,
             timeout=args.fence_after + 60)
        last_inside = inside.of("a")[-1][0]
        fenced_s = round(last_inside - cut_at, 1)
        both_s = round(max(0.0, last_inside - moved[0]), 1)
        log(f"inside {cut}: a's old tracker published until {fenced_s} s after the cut "
            f"(fence_after {args.fence_after:g} s); two copies of a ran for {both_s} s")
        sh("ip", "-n", netns(cut), "link", "set", "eth0", "up")
        mended_at = time.monotonic()
        was_alive = alive(a.actor_pid)
        gone = wait("the old actor process to end", lambda: not alive(a.actor_pid) and time.monotonic(),
                    timeout=180)
        log(f"mended {cut}'s link; its old actor process (pid {a.actor_pid}, "
            f"{'still there' if was_alive else 'gone already'}) ended {gone - mended_at:.1f} s later")
        print(json.dumps({
            "health_checks": "fast" if args.fast_detection else "default", "fence_after_s": args.fence_after,
            "unreachable_s": round(unreachable - cut_at, 1), "detected_s": round(detected - cut_at, 1),
            "running_again_s": round(moved[0] - cut_at, 1),
            "client_back_s": round(back[0] - cut_at, 1), "objects_back": back[3],
            "b_messages_during": len(b_during), "b_longest_gap_s": round(max(gaps, default=0), 2),
            "b_restarts": b_entry.restarts, "old_tracker_silent_s": fenced_s, "two_copies_s": both_s,
            "old_actor_ended_after_mend_s": round(gone - mended_at, 1)}), flush=True)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        tear_down_network()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
