"""How this machine's CPU scales a ResNet18 train step: torch threads vs processes.

python scripts/bench_threads.py                 # 1 thread, 2 threads, two 1-thread processes
python scripts/bench_threads.py --image-size 64 --steps 30

Tells whether flair-fl's CPU actors should get one core each (processes scale, threads do
not) and how much two concurrent training processes slow each other down.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence


def step_ms(threads: int, image_size: int, batch: int, steps: int) -> float:
    """Mean time of one SGD step (after 5 warm-up steps), milliseconds."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = torchvision.models.resnet18(num_classes=17)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.rand(batch, 17)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # one child's run
    args = parser.parse_args(argv)
    if args.threads:
        print(f"{step_ms(args.threads, args.image_size, args.batch_size, args.steps):.1f}")
        return 0

    def child(threads: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, __file__, "--threads", str(threads), "--steps", str(args.steps),
             "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def result(p: subprocess.Popen[str]) -> str:
        return p.communicate()[0].strip()

    print(f"ResNet18 train step, {args.image_size} px, batch {args.batch_size}:")
    print(f"  1 thread:                       {result(child(1))} ms")
    print(f"  2 threads:                      {result(child(2))} ms")
    pair = [child(1), child(1)]
    print(f"  two 1-thread processes at once: {' and '.join(result(p) for p in pair)} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
