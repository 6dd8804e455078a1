"""``python -m pnmf.benchmarks``: the natural-gradient benchmark on the seed setting
(``--suite speed``: digits against scikit-learn, sparse matrices, scaling in nnz;
``--suite scale``: one process against two gloo processes on a sparse matrix;
``--suite gpu``: every GPU here against cuSPARSE and the CPU;
``--suite defaults``: the candidates for PNMF()'s defaults, held-out deviance and time;
``--suite batches``: size factors and batch effects on counts simulated with them;
``--suite workflow``: what restarts, consensus and K selection cost;
``--suite stopping``: where Monte Carlo and mini-batch fits stop at tol=1e-4, and what the
tighter bound costs)."""

from __future__ import annotations

import argparse
import importlib
import json
import warnings
from pathlib import Path

from sklearn.exceptions import ConvergenceWarning

from ..backends import BACKENDS, available, get_backend
from . import natural_gradient as ng
from . import speed

# Suites that write benchmarks/SUITE.json with run(out, quick, progress) and report it with report(record).
RECORD_SUITES = ("defaults", "batches", "workflow", "stopping")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pnmf.benchmarks", description=__doc__)
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "all", *BACKENDS],
        help="auto: the backend PNMF(backend='auto') picks; all: every installed one",
    )
    parser.add_argument(
        "--suite",
        default="natural",
        choices=["natural", "speed", "scale", "gpu", "defaults", "batches", "workflow", "stopping"],
        help="natural: the natural-gradient benchmark; speed: digits, sparse and scaling timings; "
        "scale: 1 process against 2 distributed processes; gpu: every GPU here against cuSPARSE and the CPU; "
        "defaults: the candidates for PNMF()'s defaults on three data sets; "
        "batches: plain against batch-aware fits of counts simulated with batches; "
        "workflow: the cost of restarts, consensus and K selection; stopping: where Monte Carlo and "
        "mini-batch fits stop at tol=1e-4 against the same fits run to max_iter",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run (1500 iterations; under two minutes with --backend all)"
    )
    parser.add_argument(
        "--peer-python",
        default=None,
        help="speed and gpu suites: a Python with PyPI's pnmf 0.1.0 installed, to time it on the seed setting",
    )
    parser.add_argument(
        "--cpu",
        default="also",
        choices=["also", "no", "only"],
        help="gpu suite: the same fits on 2 CPU threads after the GPUs (also), not at all (no), or alone (only)",
    )
    parser.add_argument(
        "--more",
        action="store_true",
        help="gpu suite: also torch's alternatives (64-bit indices, fresh buffers), MLX's (full sums in "
        "blocks, sparse products by gathers, CUDA graphs off) and its first fits in new processes",
    )
    parser.add_argument("--max-iter", type=int, default=None, help="iterations per fit (default 8000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for JSON and figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse(argv)
    # The records say which fits converged; a warning per fit would only repeat it.
    warnings.simplefilter("ignore", ConvergenceWarning)
    if args.backend == "all":
        backends = available()
    elif args.backend == "auto":
        backends = [get_backend("auto").name]
    else:
        get_backend(args.backend)  # a clear ImportError if it is missing
        backends = [args.backend]
    if args.suite == "scale":
        from . import scale

        backend = "torch" if args.backend == "auto" and "torch" in available() else backends[0]
        if backend == "mlx":
            raise SystemExit("--suite scale runs torch.distributed: choose --backend torch or numpy")
        print(f"pnmf scale suite on {ng.machine()}; backend: {backend}")
        record = scale.run(backend)
        record["out_of_core"] = scale.out_of_core(backend)
        record["out_of_core_denser"] = scale.out_of_core(backend, scale.DENSER_DISK_DENSITY)
        record["machine"] = ng.machine()
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"scale_{backend}.json"
        path.write_text(json.dumps(record, indent=2))
        print(scale.report(record))
        print(f"\nwrote {path}")
        return record
    if args.suite == "gpu":
        from . import gpu

        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "gpu.json"
        # --cpu only adds the CPU's fits to the record a GPU machine left there, if any.
        earlier = json.loads(path.read_text()) if args.cpu == "only" and path.exists() else None
        save = lambda record: path.write_text(json.dumps(gpu.combine(earlier, record), indent=1))  # noqa: E731
        record = gpu.combine(
            earlier, gpu.run(quick=args.quick, peer_python=args.peer_python, save=save, cpu=args.cpu, more=args.more)
        )
        summary = gpu.report(record)
        (args.out / "gpu_summary.txt").write_text(summary + "\n")
        print(summary)
        print(f"\nwrote {args.out / 'gpu.json'} and {args.out / 'gpu_summary.txt'}")
        return record
    if args.suite in RECORD_SUITES:
        suite = importlib.import_module(f".{args.suite}", __package__)
        print(f"pnmf {args.suite} suite on {ng.machine()}")
        record = suite.run(args.out, quick=args.quick, progress=not args.no_progress)
        print(suite.report(record))
        print(f"\nwrote {args.out / (args.suite + '.json')}")
        return record
    if args.suite == "speed":
        print(f"pnmf speed suite on {ng.machine()}; backends: {', '.join(backends)}")
        record = speed.run(backends, args.out, quick=args.quick, peer_python=args.peer_python)
        print()
        print(speed.report(record))
        written = [args.out / name for name in ("speed.json", "speed_scaling.png") if (args.out / name).exists()]
        print("\nwrote " + " and ".join(map(str, written)))
        return record
    setting = ng.Setting()
    if args.quick:
        setting.max_iter = 1500
    if args.max_iter is not None:
        setting.max_iter = args.max_iter
    print(f"pnmf natural-gradient benchmark on {ng.machine()}; backends: {', '.join(backends)}")
    print(f"setting: {setting}")
    runs = ng.run(backends, args.out, setting, progress=not args.no_progress)
    print()
    print(ng.table(runs))
    print()
    print("Iterations to within 1e-3 of the best final ELBO (standard / natural):")
    print(ng.speedup_table(ng.speedups(runs)))
    print(f"\nwrote {args.out / 'natural_gradient.json'} and the figures to {args.out}/")
    return runs


if __name__ == "__main__":
    main()
