"""`mortar volfile check FILE`: validate a hand-written or generated volfile without starting it."""

from __future__ import annotations

from mortar.cli.command import CliError, Context, Result, command, expect
from mortar.core.options import OptionError
from mortar.graph.builder import VolfileError, load
from mortar.graph.registry import KNOWN_TYPES, UnknownTypeError, translator_class


@command(
    "volfile check",
    "volfile check FILE",
    "check a volfile: grammar, translator types, option names and values, one root",
    details="""
Builds the translator graph the file describes without starting it, so every refusal a brick or
client would give (unknown type or option, bad value, missing or cyclic subvolume, two roots) is
reported with the file, line and reason. Prints the graph as a tree from its top.
""",
)
def volfile_check(args: list[str], ctx: Context) -> Result:
    (path,) = expect(args, 1, "volfile check FILE")
    try:
        graph = load(path)
    except (VolfileError, OptionError, UnknownTypeError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    lines: list[str] = []

    def walk(name: str, depth: int) -> None:
        xl = graph.xlators[name]
        lines.append(f"{'  ' * depth}{name} ({xl.type_name})")
        for child in xl.children:
            walk(child.name, depth + 1)

    walk(graph.top.name, 0)
    data = {
        "file": path,
        "top": graph.top.name,
        "translators": [
            {"name": xl.name, "type": xl.type_name, "subvolumes": [c.name for c in xl.children]}
            for xl in graph.xlators.values()
        ],
    }
    return Result(f"{path}: OK, {len(graph.xlators)} translators\n" + "\n".join(lines), data)


@command(
    "volfile options",
    "volfile options [TYPE]",
    "list translator types, or the options one type accepts (type, default, range, description)",
)
def volfile_options(args: list[str], ctx: Context) -> Result:
    if len(args) > 1:
        raise CliError("usage: mortar volfile options [TYPE]", status=2)
    types = args or sorted(KNOWN_TYPES)
    data: dict[str, dict[str, dict[str, object]]] = {}
    lines: list[str] = []
    for type_name in types:
        try:
            cls = translator_class(type_name)
        except UnknownTypeError as exc:
            raise CliError(str(exc)) from None
        data[type_name] = {}
        lines.append(type_name)
        for key, opt in sorted(cls.options.items()):
            bounds = ""
            if opt.choices:
                bounds = " one of " + "|".join(opt.choices)
            elif opt.min is not None or opt.max is not None:
                low, high = ("" if v is None else f"{v:g}" for v in (opt.min, opt.max))
                bounds = f" range {low}..{high}"
            default = opt.format(opt.default) if opt.default not in ("", None) else "(none)"
            lines.append(
                f"    option {key} <{opt.type}>  default {default}{bounds}\n        {opt.description}"
            )
            data[type_name][key] = {
                "type": opt.type,
                "default": opt.default,
                "min": opt.min,
                "max": opt.max,
                "choices": list(opt.choices),
                "description": opt.description,
            }
    return Result("\n".join(lines), data)
