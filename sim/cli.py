"""shelf-sim: render scenario videos with ground truth, generate a YOLO dataset, list the shipped scenarios."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shelfsight.runtime.errors import ShelfSightError

EXIT_USAGE = 2


def _scenario_path(value: str) -> Path:
    """A file path, or the name of a scenario shipped with the package (e.g. 'demo')."""
    from shelfsight.sim import bundled_scenario, bundled_scenario_names

    path = Path(value)
    if path.exists() or value.removesuffix(".yaml") not in bundled_scenario_names():
        return path
    return bundled_scenario(value)


def _render(args: argparse.Namespace) -> int:
    from shelfsight.sim.scenario import load_scenario
    from shelfsight.sim.video import render_scenario

    scenario = load_scenario(_scenario_path(args.scenario))
    result = render_scenario(scenario, args.out, png_frames=args.png_frames, show_progress=not args.quiet)
    media = result.video if result.video is not None else result.frames_dir
    print(
        f"{scenario.name}: {result.frame_count} frames {scenario.camera.width}x{scenario.camera.height} "
        f"in {result.seconds:.1f} s -> {media}, {result.truth.name}, {result.layout.name}"
    )
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from shelfsight.sim.dataset import generate_dataset

    data_yaml = generate_dataset(
        args.out,
        args.images,
        seed=args.seed,
        val_fraction=args.val_fraction,
        width=args.width,
        height=args.height,
        show_progress=not args.quiet,
    )
    print(f"{args.images} images -> {data_yaml}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from shelfsight.sim import bundled_scenario, bundled_scenario_names
    from shelfsight.sim.scenario import load_scenario

    for name in bundled_scenario_names():
        path = bundled_scenario(name)
        scenario = load_scenario(path)
        kinds = sorted({event.type for event in scenario.events})
        print(
            f"{name:<20} {scenario.duration_s:>6g} s  {scenario.camera.width}x{scenario.camera.height} "
            f"@ {scenario.fps:g} fps  {scenario.shelf.rows}x{scenario.shelf.slots_per_row} slots  "
            f"{len(scenario.events)} events ({', '.join(kinds)})  {path if args.paths else ''}".rstrip()
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shelf-sim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser("render", help="render a scenario to video.mp4 + truth.json + layout.yaml")
    render.add_argument("scenario", help="scenario YAML file, or the name of a shipped scenario (see 'list')")
    render.add_argument("--out", required=True, type=Path, help="output folder")
    render.add_argument(
        "--png-frames", action="store_true", help="write lossless frames/NNNNNN.png instead of video.mp4"
    )
    render.add_argument("--quiet", action="store_true", help="no progress bar")
    render.set_defaults(handler=_render)

    dataset = commands.add_parser("dataset", help="generate a YOLO detection dataset (0=product, 1=gap)")
    dataset.add_argument("--out", required=True, type=Path, help="dataset folder (data.yaml is written there)")
    dataset.add_argument("--images", required=True, type=int, help="number of images")
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument("--val-fraction", type=float, default=0.2)
    dataset.add_argument("--width", type=int, default=640)
    dataset.add_argument("--height", type=int, default=384)
    dataset.add_argument("--quiet", action="store_true", help="no progress bar")
    dataset.set_defaults(handler=_dataset)

    listing = commands.add_parser("list", help="list the scenarios shipped with the package")
    listing.add_argument("--paths", action="store_true", help="also print each file's path")
    listing.set_defaults(handler=_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ShelfSightError as exc:
        print(f"shelf-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shelf-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
