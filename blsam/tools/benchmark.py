"""Side-by-side speed benchmark: official SAM encoder vs our fused one vs bLViT at several keep
ratios.

One command, one run: the headline is the ratio to the official encoder measured in the same
run (absolute times drift between machines and with load). Per model: GFLOPs in the paper's
convention (whole SAM, one prompt) and in the full one (encoder, attention included), latency
median and spread after warm-up, peak memory and images/s, for each device, dtype and batch
size asked for.

    blsam-benchmark --quick                       # ViT-B family, fp32, batch 1
    blsam-benchmark --families b h --dtypes fp32 bf16 --batch-sizes 1 8
    blsam-benchmark --quick --onnx --e2e          # + ONNX Runtime and SAM end to end
    blsam-benchmark --families b --keep-ratios 0.25 --cpu-dtypes fp32 bf16 autocast \\
        --profile-ops                             # + where each precision's time goes

Fair by default: every model runs in a persistent worker process of its own (``--isolation
process``), all started with the same allocator setting, once with glibc's default allocator
and once tuned (``--malloc``; no page faults per forward), so no model inherits another's
fragmented heap. This process drives the workers round-robin, one forward per model per round,
so a drifting machine slows them alike. Minor page faults per forward are recorded, and the
CPU's ISA (AVX2 / AVX-512 / AMX, native bf16 or not) goes into the environment record.

Weights are random: latency does not depend on them (k tokens per window are routed whatever
the scores are), and no checkpoint download is needed.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from blsam.bench.config import DTYPES, BenchConfig, default_devices  # noqa: F401 - re-export
from blsam.bench.jobs import PHOTOS
from blsam.bench.models import extra_specs, model_specs
from blsam.bench.results import Result
from blsam.bench.run import main as run_benchmark
from blsam.specs import ABLATION_ORDER, FAMILIES, MODEL_SPECS, check_img_size, check_keep_ratio
from blsam.utils.cli import check_device, check_option, one_line_parse_errors, run_cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["b"], choices=sorted(FAMILIES),
                   help="b: vit_b vs b_t; h: vit_h vs h_b; tiny: the test pair; the first "
                        "family's student also sets the GEMM replay and --photos rows")
    p.add_argument("--keep-ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--ablation", action="store_true",
                   help="also time the student's Table-3 design steps (b_t_early_prune, "
                        "b_t_eblock, b_t_predictor) at --keep-ratios")
    p.add_argument("--baselines", action="store_true",
                   help="also time each family's token-pruning baselines (EViT, Evo-ViT) at "
                        "keep 0.5, the paper's Table 2 setting")
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: cuda on a GPU node (CPU rows there would only spend node "
                        "time), else cpu; give both for both")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--cpu-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes on CPU if different (large batches are slow there)")
    p.add_argument("--cpu-dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                   help="dtypes on CPU if different (bf16: the model cast with "
                        ".to(torch.bfloat16); autocast: fp32 weights under "
                        "torch.autocast('cpu', torch.bfloat16))")
    p.add_argument("--profile-ops", action="store_true",
                   help="after the timed runs, one profiled forward per row: self CPU time "
                        "per op class (GEMM, attention, elementwise, gather/scatter, copy)")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (fixed, printed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--malloc", choices=["default", "tuned", "both"], default="both",
                   help="glibc allocator: default, tuned (mallopt: freed memory stays in the "
                        "process, no page faults per forward), or both (default), each in a "
                        "fresh process; the headline ratio is the fault-free one")
    p.add_argument("--tune-malloc", action="store_true", help="same as --malloc tuned")
    p.add_argument("--isolation", choices=["process", "shared"], default="process",
                   help="process: every model (and the GEMM probe) in a persistent worker "
                        "process of its own, started with the --malloc setting, driven "
                        "round-robin (no model inherits another's heap: fault-free with the "
                        "tuned allocator); shared: all in one process per setting (fast, for "
                        "tests; models fragment each other's heap)")
    p.add_argument("--onnx", action="store_true",
                   help="add ONNX Runtime rows (CPU, fp32, batch 1) for the official encoder, "
                        "the fused one and every keep ratio, exported as blsam-export-onnx "
                        "does")
    p.add_argument("--timm", choices=["auto", "skip"], default="auto",
                   help="auto: timm's SAM ViT as a row when timm is installed")
    p.add_argument("--allow-emulated-bf16", action="store_true",
                   help="time CPU bf16 rows even without native bf16 (very slow)")
    p.add_argument("--e2e", action="store_true",
                   help="end to end on real photos: SamPredictor.set_image + predict and "
                        "SamAutomaticMaskGenerator.generate (defaults), official vs bLViT "
                        "with and without skip_padding; share of AMG time in the encoder")
    p.add_argument("--e2e-photos", nargs="+", default=["4:3"], choices=sorted(PHOTOS))
    p.add_argument("--e2e-amg-repeats", type=int, default=1)
    p.add_argument("--e2e-points-per-side", type=int, default=32,
                   help="AMG grid (SAM's default 32); smaller only for tests")
    p.add_argument("--quick", action="store_true",
                   help="ViT-B family, keep 0.25 and 1.0, fp32, batch 1, 1 warm-up, 3 runs")
    p.add_argument("--cpu-memory", choices=["probe", "skip"], default="probe",
                   help="probe: CPU peak memory of each model in a fresh process (one forward)")
    p.add_argument("--gemm-rate", choices=["measure", "burst", "skip"], default="measure",
                   help="measure this machine's dense fp32 GEMM rate on b_t's matmul shapes: "
                        "burst (each shape alone, once) and sustained (all of them replayed "
                        "around every timed CPU fp32 forward; slower)")
    p.add_argument("--photos", nargs="*", default=[], choices=sorted(PHOTOS),
                   help="also time SamPredictor.set_image on real photos of these aspect "
                        "ratios: official ViT-B vs b_t with and without skip_padding")
    p.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                   help="time only these of the planned rows (names as in the table, e.g. "
                        "vit_h h_b@0.25 evit_h@0.5): fewer resident workers where all of "
                        "them do not fit in memory; ratios need the official row")
    p.add_argument("--skip-models", action="store_true",
                   help="only the --photos rows (and the GEMM rate)")
    p.add_argument("--output-dir", default="outputs/benchmark")
    args = one_line_parse_errors(p).parse_args(argv)
    if args.tune_malloc:
        args.malloc = "tuned"
    if args.quick:
        args.families, args.keep_ratios, args.dtypes = ["b"], [0.25, 1.0], ["fp32"]
        args.batch_sizes, args.cpu_batch_sizes, args.cpu_dtypes = [1], [1], ["fp32"]
        args.warmup, args.repeats = 1, 3
    for r in args.keep_ratios:
        check_option(check_keep_ratio, r, "--keep-ratios")
    check_option(check_img_size, args.img_size, "--img-size")
    for name in ("batch_sizes", "cpu_batch_sizes"):
        if any(b < 1 for b in getattr(args, name) or []):
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threads", "e2e_amg_repeats", "e2e_points_per_side"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.onnx and args.families and any(f not in FAMILIES for f in args.families):
        p.error("--onnx: unknown family")
    stepped = {MODEL_SPECS[n].ablation_of for n in ABLATION_ORDER[:-1]}
    if args.ablation and not any(FAMILIES[f][1] in stepped for f in args.families):
        names = ", ".join(sorted(stepped))
        p.error(f"--ablation: the Table-3 design steps are variants of {names};"
                " no family in --families has them")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    if args.rows:
        # the names the plan has (blsam.bench.run._plan): the models, timm's and the ORT rows
        planned = [s.name for s in model_specs(args.families, args.keep_ratios, args.baselines,
                                               args.ablation) + extra_specs(config(args))]
        unknown = [r for r in args.rows if r not in planned]
        if unknown:
            p.error(f"--rows: {', '.join(unknown)} not among the planned rows "
                    f"({', '.join(planned)})")
    return args


def config(args: argparse.Namespace) -> BenchConfig:
    """The typed settings the library takes, built once from the parsed command line."""
    return BenchConfig.from_mapping(vars(args))


def main(args: argparse.Namespace) -> list[Result]:
    """Run the benchmark the command line asks for; returns its rows (photo rows last)."""
    return run_benchmark(config(args))


def cli(argv: list[str] | None = None) -> int:
    """``blsam-benchmark``: a user error is one ``error:`` line and exit 2."""

    def body() -> None:
        args = parse_args(argv)
        for dev in args.devices or ():  # here, not in a worker process: one line, exit 2
            check_device(dev, "--devices")
        main(args)

    return run_cli(body, extra="bench", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
