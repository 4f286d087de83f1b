"""A tiny RTSP server for the capture tests, built on GStreamer's RTSP server.

Run it with the *system* Python, which has the GObject bindings (``gi``)::

    /usr/bin/python3 tests/rtsp_server.py --port 0 --name cam

It serves H.264 on ``rtsp://127.0.0.1:PORT/NAME`` (bound to 127.0.0.1 only),
either a live ``videotestsrc`` pattern or, with ``--clip FILE.mp4``, an H.264
MP4 clip played once per session at its own rate (its end reaches clients as
EOF). Once listening it prints one line to stdout::

    READY rtsp://127.0.0.1:PORT/NAME

``--port 0`` picks a free port; the ready line tells which. If GStreamer or a
needed plugin is missing it prints ``MISSING ...`` naming the Debian packages
and exits with status 3, so the test fixture can fail with a useful message.
"""

from __future__ import annotations

import argparse
import signal
import sys

PACKAGES = (
    "gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-tools"
)
EXIT_MISSING = 3


def _missing(what: str) -> None:
    print(f"MISSING {what}: apt-get install -y {PACKAGES}", flush=True)
    sys.exit(EXIT_MISSING)


def _import_gst():
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as exc:
        _missing(f"GStreamer RTSP server bindings ({exc})")
    Gst.init(None)
    return GLib, Gst, GstRtspServer


def _launch_line(args: argparse.Namespace) -> str:
    if args.clip:
        # The clip is already H.264: payload it without re-encoding (no decoder
        # plugin needed). The RTSP server paces it by its timestamps.
        return (
            f'( filesrc location="{args.clip}" ! qtdemux ! '
            "rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
    # A live source paced at its frame rate, encoded for low latency with a short
    # GOP so a reconnecting client gets a keyframe quickly.
    return (
        f"( videotestsrc is-live=true pattern={args.pattern} ! "
        f"video/x-raw,width={args.width},height={args.height},"
        f"framerate={args.fps}/1,format=I420 ! "
        f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.gop} "
        "bframes=0 ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def _check_plugins(gst, args: argparse.Namespace) -> None:
    needed = ["rtph264pay", "qtdemux", "filesrc"] if args.clip else [
        "videotestsrc", "x264enc", "rtph264pay"]
    absent = [name for name in needed if gst.ElementFactory.find(name) is None]
    if absent:
        _missing("GStreamer elements " + ", ".join(absent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 = any free port")
    parser.add_argument("--name", default="test", help="mount point name")
    parser.add_argument("--clip", help="serve this H.264 MP4 instead of a test pattern")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=10, help="keyframe interval in frames")
    parser.add_argument("--pattern", default="ball", help="videotestsrc pattern")
    parser.add_argument("--udp-only", action="store_true",
                        help="offer RTP over UDP only, as some cameras do (no TCP interleaving)")
    args = parser.parse_args(argv)

    glib, gst, rtsp = _import_gst()
    import gi
    _check_plugins(gst, args)

    server = rtsp.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = rtsp.RTSPMediaFactory()
    factory.set_launch(_launch_line(args))
    # One pipeline for all clients; it is rebuilt when the last client leaves.
    factory.set_shared(True)
    if args.udp_only:
        gi.require_version("GstRtsp", "1.0")
        from gi.repository import GstRtsp

        factory.set_protocols(GstRtsp.RTSPLowerTrans.UDP)
    server.get_mount_points().add_factory(f"/{args.name}", factory)
    if server.attach(None) == 0:
        print(f"ERROR cannot listen on 127.0.0.1:{args.port}", flush=True)
        return 1

    loop = glib.MainLoop()
    # SIGTERM/SIGINT end the main loop so the process exits promptly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        glib.unix_signal_add(glib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}/{args.name}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
