"""Recipe configs: YAML recipe + ``--name value`` parsing, validation, ``--help``.
Not here: the option groups (options.py); what a run does with its options; resume matching of configs (checkpoint.py).

Every field has one name, one default and one help text (``metadata["help"]``, what ``--help`` prints);
constraints (``choices``, ``min``, ``max``, ``min_exclusive``) are checked in :func:`validate`; a ``path`` option is
expanded (:func:`expand_path`). A problem is a :class:`ConfigError`: one line, exit code 2, before any data or model
is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import operator
import os
import re
import sys
import types
import typing
from dataclasses import field
from typing import Any

import yaml

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A problem with the user's input; reported as one line and exit code 2."""


class RunError(RuntimeError):
    """A run that cannot go on (disk full, non-finite loss); reported as one line and exit code 1."""


def opt(default, help: str, **constraints):
    """A config field with a help text and optional constraints (choices/min/max/min_exclusive), ``auto`` (the value
    may be "auto") and ``path`` (a file or folder: ``~`` and ``$VAR`` are expanded)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


# --- Parsing --------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _base_type(tp):
    """(base type, optional?) of a hint like ``int | None``; a list's items' type stays: ``list[float]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        return (non_none[0] if len(non_none) == 1 else str), True
    return tp, False


def _coerce(name: str, value: Any, tp, auto: bool = False) -> Any:
    """Convert a YAML or command-line value to the field's type (or "auto" where ``auto``), or raise ConfigError."""
    base, optional = _base_type(tp)
    item_type = typing.get_args(base)[0] if typing.get_origin(base) is list else None
    base = typing.get_origin(base) or base
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got null)")
    if base is bool:
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            value = value.lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if base in (int, float):
        if auto and isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:  # YAML 1.1 reads "2e-4" as a string; float() accepts it
            number = float(value) if not isinstance(value, (bool, int)) else value
            if isinstance(number, bool) or (base is int and not float(number).is_integer()):
                raise ValueError
            return int(number) if base is int else float(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: expected {'an integer' if base is int else 'a number'}"
                              f"{' or auto' if auto else ''}, got {value!r}") from None
    if base in (list, dict):
        if isinstance(value, str):  # a YAML flow list or mapping, or comma-separated list items
            text = value.strip()
            value = (_yaml_value(name, text) if base is dict or text.startswith("[")
                     else [v.strip() for v in text.split(",") if v.strip()])
        if not isinstance(value, base):
            raise ConfigError(f"{name}: expected {'a list' if base is list else 'a mapping'}, got {value!r}")
        glued = [str(k) for k, v in value.items() if v is None and ":" in str(k)] if base is dict else []
        if glued:  # {ham:0} is the key "ham:0" with no value
            key, _, rest = glued[0].partition(":")
            raise ConfigError(f"{name}: {glued[0]!r} reads as a key without a value; YAML needs a space after each "
                              f"colon: {{{key}: {rest}}}")
        return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)] if item_type else value
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (which YAML forbids; PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:  # the mapping's own keys (not those merged in with <<), as YAML types them
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, mark = self.construct_object(key_node), key_node.start_mark
                if key in first:
                    raise yaml.constructor.ConstructorError(problem=f"{key!r} given twice (first at {first[key]})",
                                                            problem_mark=mark)
                first[key] = f"{mark.line + 1}:{mark.column + 1}"
        return super().construct_mapping(node, deep)


def _yaml_value(name, text):
    try:
        return yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: cannot parse {text!r}: {getattr(e, 'problem', None) or e.__class__.__name__}") from None


def load_yaml_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise not_found("config file not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeys)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value, got {type(data).__name__}")
    return data or {}


def _known(cls, values: dict, where: str) -> dict:
    """``values``, whose keys must all be options of ``cls`` (else the error names the first unknown one and ``where``)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(str(key), names, where)
    return values


def _unknown(name: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see --help)"
    (error := ConfigError(f"unknown option {name!r} in {where}{hint}")).where = where  # (cli.py: a recipe's script)
    return error


def option_groups(cls) -> list[tuple[str | None, list]]:
    """(group, fields) of a config class: its own options (group None), then each group's of options.py in the order
    the class lists them (the order of --help and of a saved config.yaml; dataclasses put the last group first)."""
    fields, owner, groups = {f.name: f for f in dataclasses.fields(cls)}, {}, []
    for klass in cls.__mro__:  # an option the class declares again (another default) stays in its group
        owner.update(dict.fromkeys(inspect.get_annotations(klass), klass))
    for klass in cls.__mro__:
        if own := [fields[name] for name in inspect.get_annotations(klass) if owner[name] is klass and name in fields]:
            groups.append((None if klass is cls else klass.__name__.removesuffix("Arguments").replace("Lora", "LoRA"), own))
    return groups


def help_text(cls, prog: str) -> str:
    lines = [f"usage: {prog} [--config RECIPE.yaml ...] [--OPTION VALUE ...] [--print_config] [--help]", "",
             (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
             "Options (YAML recipe keys; a later --config overrides an earlier one, a command-line --OPTION VALUE "
             "overrides them all):"]
    hints = typing.get_type_hints(cls)
    for group, own in option_groups(cls):
        lines += ["", f"{group} options:" if group else f"{prog}'s own options:"]
        for f in own:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            base, _ = _base_type(hints[f.name])
            tname = str(base) if typing.get_origin(base) is list else getattr(base, "__name__", str(base))
            tname = tname.replace("str", "path") if f.metadata.get("path") else tname
            choices = [str(c) for c in f.metadata.get("choices", []) if c is not None]
            extra = " {" + ", ".join(choices) + "}" if choices else ""
            lines.append(f"  --{f.name} {tname.upper()}{'|auto' if f.metadata.get('auto') else ''}{extra}")
            said = f.metadata.get("help", "")  # a help text that explains its default is not followed by another
            lines.append(f"      {said}" + ("" if "(default:" in said else f" (default: {default!r})"))
    return "\n".join(lines)


def parse(cls, argv: list[str] | None = None, *, exit_on_error: bool = True):
    """Build ``cls`` from ``--config recipe.yaml`` plus ``--name value`` overrides, then validate. On bad input prints
    one line ``error: ...`` to stderr and exits with code 2 (or raises ConfigError when ``exit_on_error`` is False).
    ``--help`` and ``--print_config`` print and exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "script"
    try:
        if "-h" in argv or "--help" in argv:
            print(help_text(cls, prog))
            sys.exit(0)
        if not argv:  # (else: "model_name_or_path: required")
            raise ConfigError(f"no recipe: {prog} --config RECIPE.yaml [--option value ...] (recipes/*.yaml; --help "
                              f"lists the options)")
        config_paths, print_config, overrides = _split_argv(argv, cls)
        # the recipes in the order given, a later one's keys replacing an earlier one's (whole values)
        values = {k: v for path in config_paths for k, v in _known(cls, load_yaml_recipe(path), path).items()}
        config = build(cls, values, overrides)
        # which options the user set (recipe or command line), e.g. to layer them over a saved config
        object.__setattr__(config, "explicit", {**values, **overrides})
    except ConfigError as e:
        if not exit_on_error:
            raise
        fail(e)
    if print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        sys.exit(0)
    return config


def expand_path(name: str, value):
    """A path option (or list of them) with ``~`` and ``$VAR`` / ``${VAR}`` expanded, as a shell would have done on the
    command line (a recipe is read by no shell: else ``output_dir: ~/runs`` makes a folder named ``~``)."""
    if isinstance(value, list):
        return [expand_path(f"{name}[{i}]", v) for i, v in enumerate(value)]
    expanded = os.path.expandvars(os.path.expanduser(value))
    if unset := re.search(r"\$(\w+|\{[^}]*\})", expanded):
        raise ConfigError(f"{name}: {value!r} names the environment variable {unset.group()}, which is not set")
    return expanded


def path_like(source: str) -> bool:
    """A model or dataset name that is a folder, not a hub id ("owner/name")."""
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1


def not_found(what: str, path: str) -> ConfigError:
    return ConfigError(f"{what}: {path}" + (f" ({hint})" if (hint := relative_hint(path)) else ""))


def check_writable(path: str, what: str, variable: str) -> None:
    """A folder a library will write into (a cache; made here if missing, as the library would): where it cannot be
    written (a read-only or full home on a compute node), one line naming it and the variable that moves it, before
    the library fails with a traceback halfway through the run (W&B: at the first evaluation's table)."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written ({e.strerror or e}): set {variable} to a folder you can "
                          f"write") from None


def check_datasets_cache() -> None:
    """``datasets.load_dataset`` writes each file it reads, as Arrow, into its cache (under the home folder)."""
    import datasets

    check_writable(datasets.config.HF_DATASETS_CACHE, "the datasets cache", "HF_DATASETS_CACHE (or HF_HOME)")


def relative_hint(path: str) -> str:
    """For a relative ``path`` that is not there: where it was looked for, and where it is if it is in this checkout
    (a command run from another folder than the repository root, whose recipes name paths from there); "" if absolute;
    that it is a folder where a file was wanted."""
    if os.path.isdir(path):
        return "a folder, not a file"
    if os.path.isabs(path):
        return ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else ".")))
    there = f"; it is in {root}: run the command from there" if os.path.exists(os.path.join(root, path)) else ""
    return f"relative to the current directory, {os.getcwd()}{there}"


def fail(error, code: int = EXIT_BAD_INPUT, prefix: str = "error: ", stream=None):
    """Report a user error as one line (once, where several processes of a launch meet it) on ``stream`` (stderr)
    and exit."""
    from tqdm import tqdm  # (a dependency of transformers and datasets)

    from ftkit.distributed import said_by_another_rank
    for bar in list(getattr(tqdm, "_instances", [])):  # or a progress bar would redraw itself after the error line
        bar.close()
    if not said_by_another_rank(f"{prefix}{error}"):
        (stream or sys.stderr).write(f"{prefix}{error}\n")  # one write (line-buffered): ranks' lines do not interleave
        (stream or sys.stderr).flush()
    sys.exit(code)


def _split_argv(argv, cls):
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    config_paths, print_config, overrides = [], False, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            recipe = arg.endswith((".yaml", ".yml"))
            hint = f"a recipe is given as --config {arg}" if recipe else "options are written --name value"
            raise ConfigError(f"unexpected argument {arg!r} ({hint})")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        has_value = bool(eq)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if not has_value and nxt is not None and not nxt.startswith("--"):
            val, has_value = nxt, True
            i += 1
        i += 1
        if key == "config":
            if not has_value:
                raise ConfigError("--config needs a path to a YAML recipe")
            config_paths.append(expand_path("--config", val))
        elif key == "print_config":
            print_config = True if not has_value else _coerce("print_config", val, bool)
        elif key in names:
            if not has_value:
                if _base_type(hints[key])[0] is not bool:
                    raise ConfigError(f"--{key} needs a value")
                val = True
            overrides[key] = val
        else:
            raise _unknown(key, sorted(names | {"config", "print_config"}), "the command line")
    return config_paths, print_config, overrides


def build(cls, values: dict, overrides: dict | None = None, where: str = "the recipe"):
    """Merge recipe values and overrides into ``cls``, coercing types and validating."""
    merged = {**_known(cls, values, where), **(overrides or {})}
    hints, meta = typing.get_type_hints(cls), {f.name: f.metadata for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(k, v, hints[k], bool(meta[k].get("auto"))) for k, v in merged.items()}
    config = cls(**{k: expand_path(k, v) if meta[k].get("path") and v is not None else v for k, v in kwargs.items()})
    validate(config)
    return config


def validate(config) -> None:
    """Check every field's constraints, then the config's own cross-field ``check()``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        m = f.metadata
        if "choices" in m and value not in m["choices"]:
            choices = ", ".join(str(c) for c in m["choices"] if c is not None)
            raise ConfigError(f"{f.name}: {value!r} is not one of: {choices}")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for key, holds, word in (("min", operator.ge, ">="), ("max", operator.le, "<="),
                                 ("min_exclusive", operator.gt, ">")):
            if key in m and not holds(value, m[key]):
                raise ConfigError(f"{f.name}: must be {word} {m[key]}, got {value!r}")
    check = getattr(config, "check", None)
    if callable(check):
        check()


def to_dict(config) -> dict:
    values = dataclasses.asdict(config)
    return {f.name: values[f.name] for _, own in option_groups(type(config)) for f in own}
