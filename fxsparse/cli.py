"""The ``fxsparse`` command line.

    fxsparse compile MODEL [--passes A,B] [--input-shape 1,3,224,224] [--frontend auto|symbolic|export]
                           [--output out.pt2] [--plan plan.json] [--report-json report.json]
    fxsparse demo

MODEL is a built-in model name (see ``fxsparse.models.BUILTIN_MODELS``), ``torchvision:NAME`` (random weights), or
``path/to/file.py:factory`` / ``package.module:factory``, where ``factory()`` returns a module or a
``(module, example_inputs)`` pair. Errors fxsparse raises on purpose are printed without a traceback, exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import BadArgumentError, FxsparseError

log = logging.getLogger("fxsparse.cli")

# The pipeline `fxsparse demo` runs on every built-in model (and `fxsparse compile`'s default --passes).
DEMO_PASSES: list[str] = ["Prune", "Shrink"]

EXIT_ERROR = 2


# --------------------------------------------------------------------------------------------------- model specs


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise BadArgumentError(f"--input-shape {text!r}: give positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def _import_factory(spec: str, location: str, attribute: str) -> Any:
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise BadArgumentError(f"model {spec!r}: no file {path}")
        module_name = f"_fxsparse_user_{path.stem}"
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        if import_spec is None or import_spec.loader is None:
            raise BadArgumentError(f"model {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
        try:
            import_spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - the user's file failed: say which, in one line
            raise BadArgumentError(f"model {spec!r}: importing {path} raised {type(error).__name__}: {error}") from error
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise BadArgumentError(f"model {spec!r}: cannot import module {location!r} ({error})") from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise BadArgumentError(f"model {spec!r}: {location} has no attribute {attribute!r}")
    if not callable(factory):
        raise BadArgumentError(f"model {spec!r}: {location}:{attribute} is not callable")
    return factory


def load_model_spec(spec: str) -> tuple[torch.nn.Module, Any]:
    """The model a MODEL argument names, and its example inputs (None when the spec does not say)."""
    from .models import BUILTIN_MODELS

    if spec in BUILTIN_MODELS:
        factory, example_inputs = BUILTIN_MODELS[spec]
        return factory().eval(), example_inputs()
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        try:
            import torchvision
        except ImportError as error:
            raise BadArgumentError(f"model {spec!r}: torchvision is not installed ({error})") from error
        known = torchvision.models.list_models()
        if name not in known:
            raise BadArgumentError(f"model {spec!r}: torchvision has no model {name!r}; e.g. resnet18, vit_b_16")
        return torchvision.models.get_model(name, weights=None).eval(), None
    location, colon, attribute = spec.rpartition(":")
    if not colon or not location or not attribute:
        raise BadArgumentError(
            f"model {spec!r} is not a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), torchvision:NAME, "
            "or path/to/file.py:factory"
        )
    factory = _import_factory(spec, location, attribute)
    try:
        made = factory()
    except Exception as error:  # noqa: BLE001
        raise BadArgumentError(f"model {spec!r}: {attribute}() raised {type(error).__name__}: {error}") from error
    example_inputs = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example_inputs = made
    if not isinstance(made, torch.nn.Module):
        raise BadArgumentError(
            f"model {spec!r}: {attribute}() returned {type(made).__name__}; it must return a torch.nn.Module "
            "or a (module, example_inputs) pair"
        )
    return made.eval(), example_inputs


def parse_passes(text: str) -> list[str]:
    """``"prune,Shrink"`` -> ``["Prune", "Shrink"]``: the registered names of the passes listed."""
    from fxsparse.passes import pass_class

    return [pass_class(name.strip(), "--passes").name for name in text.split(",") if name.strip()]


def parse_pass_options(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["Prune.ratio=0.3", "Prune.importance=l1"]`` -> ``{"Prune": {"ratio": 0.3, "importance": "l1"}}``.

    A value is read as a Python literal (numbers, True, lists, dicts) when it is one, else kept as a string.
    """
    from fxsparse.passes import pass_class

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise BadArgumentError(f"--option {item!r}: write it as PASS.OPTION=VALUE, e.g. Prune.ratio=0.3")
        pass_name = pass_class(pass_name, f"--option {item!r}").name
        if pass_name not in names:
            raise BadArgumentError(f"--option {item!r}: pass {pass_name!r} is not in --passes ({', '.join(names)})")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        options.setdefault(pass_name, {})[option] = value
    return options


def build_passes(names: Sequence[str], options: dict[str, dict[str, Any]]) -> list[Any]:
    """Pass objects for ``names``; a pass with options is built with them, and an option it does not take is a
    BadArgumentError naming it."""
    from fxsparse.passes import PASSES

    passes: list[Any] = []
    for name in names:
        if name not in options:
            passes.append(name)
            continue
        accepted = inspect.signature(PASSES[name]).parameters
        for option in options[name]:
            if option not in accepted:
                raise BadArgumentError(f"--option {name}.{option}: {name} takes {', '.join(accepted) or 'no options'}")
        try:
            passes.append(PASSES[name](**options[name]))
        except (TypeError, ValueError) as error:
            if isinstance(error, BadArgumentError):
                raise
            given = ", ".join(f"{name}.{k}={v!r}" for k, v in options[name].items())
            raise BadArgumentError(f"--option {given}: {error}") from None
    return passes


# --------------------------------------------------------------------------------------------------- commands


def _compile(model: torch.nn.Module, inputs: Any, passes: Sequence[Any], frontend: str, verify: bool):
    from .api import compile as fx_compile

    return fx_compile(model, inputs, list(passes), frontend=frontend, verify=verify)


def check_output_path(option: str, path: str | None) -> None:
    """BadArgumentError for an output path that cannot be written: checked before the compile, not after it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise BadArgumentError(f"{option} {path!r} is a folder; give a file path, e.g. {target / 'out'}")
    if not target.parent.is_dir():
        raise BadArgumentError(f"{option} {path!r}: the folder {str(target.parent)!r} does not exist")


def cmd_compile(args: argparse.Namespace) -> int:
    for option, path in (("--output", args.output), ("--plan", args.plan), ("--report-json", args.report_json)):
        check_output_path(option, path)
    names = parse_passes(args.passes)
    passes = build_passes(names, parse_pass_options(args.option, names))
    model, inputs = load_model_spec(args.model)
    log.info("loaded %s (%s)", args.model, type(model).__name__)
    if args.input_shape:
        inputs = torch.randn(parse_shape(args.input_shape))
    elif inputs is None:
        inputs = torch.randn(1, 3, 224, 224) if args.model.startswith("torchvision:") else None
    if inputs is None:
        raise BadArgumentError(f"model {args.model!r} comes with no example inputs: give --input-shape")
    log.info("compiling %s with %s", args.model, ", ".join(names) or "no passes")
    result = _compile(model, inputs, passes, args.frontend, not args.no_verify)
    print(result.report)
    if args.output:
        result.save(args.output)
        print(f"saved the compiled model to {args.output}")
    if args.plan:
        result.plan.save(args.plan)
        print(f"saved the plan to {args.plan}")
    if args.report_json:
        Path(args.report_json).write_text(result.report.to_json())
        print(f"saved the report to {args.report_json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .api import load
    from .models import BUILTIN_MODELS, build
    from .verify import compare_outputs

    passes = parse_passes(",".join(DEMO_PASSES))
    with tempfile.TemporaryDirectory(prefix="fxsparse-demo-") as scratch:
        out_dir = Path(args.output_dir or scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in tqdm(sorted(BUILTIN_MODELS), desc="fxsparse demo", unit="model", disable=None):
            torch.manual_seed(0)
            model, inputs = build(name)
            log.info("demo: compiling the built-in %s model with %s", name, ", ".join(passes))
            result = _compile(model, inputs, passes, "auto", True)
            print(result.report)
            path = result.save(out_dir / f"{name}.pt2")
            result.plan.save(out_dir / f"{name}.plan.json")
            reloaded = load(path)
            with torch.no_grad():
                difference = compare_outputs(result.module(inputs), reloaded(inputs))
            print(
                f"saved {name}.pt2 and {name}.plan.json, loaded {name}.pt2 back: its outputs differ from the "
                f"compiled model's by at most {difference['max_abs']:.1e}\n"
            )
    where = f"; files in {out_dir}" if args.output_dir else ""
    print(f"demo done: {len(BUILTIN_MODELS)} models compiled with {', '.join(passes)}{where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fxsparse", description="A torch.fx compiler for pruning and sparsifying PyTorch models.")
    parser.add_argument("--version", action="version", version=f"fxsparse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step, tracebacks included")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compile_parser = commands.add_parser("compile", help="trace a model, run passes over it, print the report")
    compile_parser.add_argument(
        "model", help="a built-in model name (resnet, transformer), torchvision:NAME, or path/to/file.py:factory"
    )
    compile_parser.add_argument(
        "--passes", default=",".join(DEMO_PASSES),
        help=f"comma-separated pass names from fxsparse.passes.PASSES (default: {','.join(DEMO_PASSES)})",
    )
    compile_parser.add_argument(
        "--input-shape", help="shape of a random example input, e.g. 1,3,224,224 (default: the model's own example, "
        "or 1,3,224,224 for torchvision models)",
    )
    compile_parser.add_argument(
        "-o", "--option", action="append", default=[], metavar="PASS.OPTION=VALUE",
        help="an option of a pass, e.g. -o Prune.ratio=0.3 -o Prune.importance=l1 (repeatable)",
    )
    compile_parser.add_argument("--frontend", choices=("auto", "symbolic", "export"), default="auto")
    compile_parser.add_argument("--output", help="write the compiled model here (.pt2; fxsparse.load reads it)")
    compile_parser.add_argument("--plan", help="write the plan here (JSON)")
    compile_parser.add_argument("--report-json", help="write the report here (JSON)")
    compile_parser.add_argument("--no-verify", action="store_true", help="skip the numerical check after rewrites")
    compile_parser.set_defaults(func=cmd_compile)

    demo_parser = commands.add_parser("demo", help="compile the built-in models and print their reports")
    demo_parser.add_argument("--output-dir", help="keep the saved models and plans here (default: a temporary folder)")
    demo_parser.set_defaults(func=cmd_demo)
    return parser


@contextlib.contextmanager
def _logging_configured(verbose: bool, quiet: bool):
    """Progress to stderr as the CLI shows it, for the duration of a command; the loggers it changes are put back
    after, so that ``main()`` called in-process (tests, a user's script) leaves logging as it found it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("fxsparse")
    # torch logs warnings, graphs included, for every failed torch.export attempt; fxsparse reports those failures
    # itself, in a line each
    quieted = [] if verbose else [logging.getLogger(n) for n in ["torch", *logging.root.manager.loggerDict]
                                  if n == "torch" or n.startswith("torch.")]
    saved = [(logger, logger.level) for logger in (package, log, *quieted)]
    saved_handlers, saved_propagate = package.handlers[:], package.propagate
    package.handlers[:] = [handler]
    package.propagate = False
    package.setLevel(logging.INFO if verbose else logging.WARNING)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    for logger in quieted:
        if logger.level in (logging.NOTSET, logging.DEBUG, logging.INFO, logging.WARNING):
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        package.handlers[:], package.propagate = saved_handlers, saved_propagate
        for logger, level in saved:
            logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _logging_configured(args.verbose, args.quiet):
        try:
            return args.func(args)
        except FxsparseError as error:
            if args.verbose:
                log.exception("fxsparse failed")
            lines = str(error).strip().splitlines() or [type(error).__name__]
            print(f"fxsparse: error: {lines[0]}", file=sys.stderr)
            for line in lines[1:]:
                print(f"  {line.strip()}", file=sys.stderr)
            return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
