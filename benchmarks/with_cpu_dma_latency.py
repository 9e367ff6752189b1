"""Run a command while the CPUs are kept out of idle states (PM QoS, as cyclictest does).

    sudo .venv/bin/python benchmarks/with_cpu_dma_latency.py <python script> [args...]

Writes 0 (microseconds of allowed wake-up latency) to ``/dev/cpu_dma_latency`` and holds the
file open while ``<python script>`` runs under this interpreter; the setting ends when the
file is closed (this process exits). Needs write access to the device (root here).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.splitlines()[2].strip())
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError as exc:
        raise SystemExit(f"cannot open /dev/cpu_dma_latency: {exc}") from None
    try:
        os.write(fd, struct.pack("i", 0))
        return subprocess.call([sys.executable, *sys.argv[1:]])
    finally:
        os.close(fd)


if __name__ == "__main__":
    raise SystemExit(main())
