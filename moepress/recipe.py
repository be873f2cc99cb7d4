"""Recipes: a whole compression run in one YAML file (`moepress compress --recipe r.yaml`).

```yaml
model: ../models/dsv2-mini          # checkpoint folder or hub id
data: {path: calib.txt, n: 128, seq_len: 512, seed: 0}
output: out/dsv2-mini-mixed         # optional; `-o` on the command line wins
methods:
  - method: cd-moe-sr               # a search method ...
    layers: 1-4                     # ... that may only choose among decoder layers 1..4
    num_layers: 2                   # condense 2 of them (or memory_budget: 0.6)
    experts: 2
  - method: mone                    # a statistics method on every other MoE layer
    ratio: 0.25
    hyperparameters: {fusion_weight: 0.5}
```

- Relative local paths (`model`, `data.path`, `output`) are resolved against the folder of the
  recipe file, not the working directory, so a recipe runs the same from anywhere. A name that is
  not a local path (a hub id, a dataset name) is kept as written.
- `layers` of an entry is the set of decoder layers (0-based, as in `moepress inspect` and plans) it
  may change: `"1-4"`, `"1-3,6"` or `[1, 2, 3]`. At most one entry may leave it out; that entry gets
  every MoE layer no other entry claims. A layer may be claimed by one entry only.
- Statistics methods (mone, frequency, reap, ...) take `ratio`; search methods (cd-moe-s,
  cd-moe-sr — alias cd-moe —, layer-drop) take `num_layers` (how many of their layers to change)
  or `memory_budget` (share of the ORIGINAL model's bytes the whole output may keep, counting what
  the other entries save), and cd-moe-sr `experts`. Anything else goes in `hyperparameters`.
- Every entry decides on the original model and the same calibration tokens; the decisions are
  merged into one CompressionPlan.

`moepress compress` writes the fully resolved recipe (absolute paths, every default filled in) to
`OUT/moepress_recipe.yaml`; `moepress compress --recipe OUT/moepress_recipe.yaml -o OUT2` reruns it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moepress.errors import MoepressError

RECIPE_VERSION = 1
RECIPE_FILE = "moepress_recipe.yaml"
ALIASES = {"cd-moe": "cd-moe-sr"}
# Arguments of a search method that are not hyperparameters: the recipe or the run supplies them.
SEARCH_ARGS = ("model", "input_ids", "layers", "memory_budget", "experts", "batch_size", "device",
               "candidate_layers", "documents")


# ---- methods -------------------------------------------------------------------------------------
def method_kind(name: str) -> tuple[str, str]:
    """(canonical name, "stats" | "search") of a method name, or a one-line error listing the choices."""
    from moepress.methods.base import available_methods
    from moepress.methods.search_registry import available_search_methods

    name = ALIASES.get(name, name)
    stats, search = available_methods(), available_search_methods()
    if name in stats:
        return name, "stats"
    if name in search:
        return name, "search"
    choices = sorted([*stats, *search, *(f"{a} (= {b})" for a, b in ALIASES.items())])
    raise MoepressError(f"unknown method {name!r}; choose one of: {', '.join(choices)}")


def method_defaults(name: str) -> dict[str, Any]:
    """Every hyperparameter `name` takes, with its default (`name` is canonical)."""
    from moepress.methods.base import get_method
    from moepress.methods.search_registry import get_search_method

    if method_kind(name)[1] == "stats":
        return dict(get_method(name).hyperparameters)
    params = inspect.signature(get_search_method(name)).parameters
    return {p.name: p.default for p in params.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in SEARCH_ARGS}


# ---- layer selections ------------------------------------------------------------------------------
def parse_layers(value: Any) -> list[int] | None:
    """`"1-4"`, `"1-3,6"`, `[1, 2, 3]` or None (every remaining MoE layer) -> sorted layer ids."""
    if value is None or value == "all":
        return None
    if isinstance(value, bool) or isinstance(value, int | float):
        raise MoepressError(
            f"layers is the set of layers an entry may change (e.g. \"1-4\" or [1, 2]), not a count (got "
            f"{value!r}); the number of layers a search condenses is num_layers"
        )
    out: set[int] = set()
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        for part in parts:
            if isinstance(part, str) and "-" in part.strip()[1:]:
                lo, hi = (int(x) for x in part.strip().split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            elif isinstance(part, bool):
                raise ValueError
            else:
                out.add(int(part))
    except (TypeError, ValueError):
        raise MoepressError(f"cannot read layers {value!r}; write e.g. '1-4', '1-3,6' or [1, 2]") from None
    if not out or min(out) < 0:
        raise MoepressError(f"layers {value!r} must name at least one layer, numbered from 0")
    return sorted(out)


def format_layers(layers: list[int] | None) -> str | None:
    """The compact form of a layer list: [1, 2, 3, 5] -> "1-3,5"."""
    if layers is None:
        return None
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- the recipe ----------------------------------------------------------------------------------
class DataSpec(BaseModel):
    """Calibration text and how it is cut: `n` sequences of `seq_len` tokens chosen with `seed`.

    `layout` is how the search methods (CD-MoE, layer drop) see the text: "documents" (default, the
    CD-MoE reference's: separate documents, BOS first, truncated; `moepress.data.documents`) or
    "windows" (packed windows of the token stream, what the statistics methods always use; also what
    every entry of a recipe mixing statistics and search methods sees, so they share one set). Unset
    `n` / `seq_len` become 100 × 256 when every method is a search method (the CD-MoE reference's
    calibration), else 128 × 512.
    """

    model_config = ConfigDict(extra="forbid")
    path: str
    n: int | None = None
    seq_len: int | None = None
    seed: int = 0
    layout: Literal["documents", "windows"] = "documents"

    def resolve(self, search_only: bool) -> None:
        if self.n is None:
            self.n = SEARCH_N if search_only else STATS_N
        if self.seq_len is None:
            self.seq_len = SEARCH_SEQ_LEN if search_only else STATS_SEQ_LEN


SEARCH_N, SEARCH_SEQ_LEN = 100, 256  # CD-MoE reference: 100 C4 documents, max_length=256
STATS_N, STATS_SEQ_LEN = 128, 512


class MethodEntry(BaseModel):
    """One method applied to a set of layers."""

    model_config = ConfigDict(extra="forbid")
    method: str
    layers: list[int] | None = None
    ratio: float | None = None
    num_layers: int | None = None
    experts: int | None = None
    memory_budget: float | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        return parse_layers(v)

    @property
    def kind(self) -> str:
        return method_kind(self.method)[1]

    def check(self) -> None:
        """One-line errors for arguments that do not fit the method (no model needed)."""
        from moepress.methods.base import check_ratio

        name, kind = method_kind(self.method)
        self.method = name
        if kind == "stats":
            if self.num_layers is not None or self.experts is not None or self.memory_budget is not None:
                raise MoepressError(
                    f"{name} prunes experts by --ratio; --layers/--experts/--memory-budget (recipe: "
                    "num_layers, experts, memory_budget) belong to the search methods cd-moe-s, cd-moe-sr, "
                    "layer-drop"
                )
            if self.ratio is None:
                raise MoepressError(f"{name} needs --ratio R, the share of routed experts to prune (0.25)")
            check_ratio(self.ratio)
        else:
            if self.ratio is not None:
                raise MoepressError(
                    f"{name} condenses whole layers: give --layers N or --memory-budget F instead of --ratio "
                    "(--ratio is for expert-pruning methods such as mone)"
                )
            if (self.num_layers is None) == (self.memory_budget is None):
                raise MoepressError(
                    f"{name} needs exactly one of --layers N (layers to change) or --memory-budget F "
                    "(share of the original bytes to keep; recipe: num_layers / memory_budget)"
                )
            n = self.num_layers
            if n is not None and (isinstance(n, bool) or n < 1):
                raise MoepressError(f"--layers must be a positive number of layers (got {n})")
            b = self.memory_budget
            if b is not None and not 0 < b < 1:
                raise MoepressError(f"--memory-budget is the share of the original bytes to keep, in (0, 1); "
                                    f"got {b}")
            if name == "cd-moe-sr":
                # None: the model's top-k, resolved by the method (the paper's setting)
                if self.experts is not None and self.experts < 1:
                    raise MoepressError(
                        f"cd-moe-sr keeps at least one routed expert per layer (got --experts "
                        f"{self.experts}); use cd-moe-s to keep the shared experts only"
                    )
            elif self.experts is not None:
                raise MoepressError(f"{name} keeps no routed expert; --experts is for cd-moe-sr")
        defaults = method_defaults(name)
        unknown = sorted(set(self.hyperparameters) - set(defaults))
        if unknown:
            takes = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
            raise MoepressError(
                f"method {name!r} has no hyperparameter {', '.join(unknown)}; it takes: {takes}"
            )
        # every default written out, so a saved recipe says exactly how the plan was made
        self.hyperparameters = {**defaults, **self.hyperparameters}


def keeps_top_k(name: str) -> bool:
    """Whether search method `name` keeps the layer's top-k routed experts when --experts is not given
    (its `experts` parameter defaults to None); methods without the parameter keep none."""
    from moepress.methods.search_registry import get_search_method

    param = inspect.signature(get_search_method(name)).parameters.get("experts")
    return param is not None and param.default is None


class Recipe(BaseModel):
    """A whole run: model, calibration data, methods by layer range, output and run settings."""

    model_config = ConfigDict(extra="forbid")
    version: int = RECIPE_VERSION
    model: str
    data: DataSpec
    methods: list[MethodEntry]
    output: str | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle (.bin) weights, with torch.load(weights_only=True)
    quantize: str | None = None  # write the output as compressed-tensors fp8, w4a16, ... (`moepress.quant.export`)

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, v):
        return {"path": v} if isinstance(v, str) else v

    # ---- files -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise MoepressError(f"recipe {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            first = " ".join(str(err).split())[:200]
            raise MoepressError(f"recipe {path} is not valid YAML: {first}") from None
        if not isinstance(raw, dict):
            raise MoepressError(f"recipe {path} must be a YAML mapping with model, data and methods")
        try:
            recipe = cls.model_validate(raw)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(x) for x in e["loc"])
            raise MoepressError(f"recipe {path}: {where}: {e['msg']}") from None
        except MoepressError as err:
            raise MoepressError(f"recipe {path}: {err}") from None
        base = path.resolve().parent
        recipe.model = resolve_path(recipe.model, base)
        recipe.data.path = resolve_path(recipe.data.path, base)
        if recipe.output is not None:
            recipe.output = str((base / recipe.output).resolve())
        return recipe

    def to_yaml(self) -> str:
        d = self.model_dump(mode="json")
        d["methods"] = [
            {
                k: (format_layers(v) if k == "layers" else v)
                for k, v in e.model_dump(mode="json").items()
                if v is not None and (k != "hyperparameters" or v)
            }
            for e in self.methods
        ]
        return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        from moepress.io.manifest import moepress_version

        path = Path(path)
        head = (f"# moepress {moepress_version()} resolved recipe; rerun: "
                f"moepress compress --recipe {path.name} -o NEW_OUTPUT\n")
        path.write_text(head + self.to_yaml())
        return path

    # ---- checks ------------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that can be checked without loading the model, as one-line errors."""
        from moepress.models.loading import resolve_device, resolve_dtype

        if not self.methods:
            raise MoepressError("the recipe lists no methods; add at least one entry under methods:")
        d = self.data
        d.resolve(search_only=all(e.kind == "search" for e in self.methods))
        if d.n <= 0:
            raise MoepressError(f"-n must be positive (got {d.n}); use -n 128 for example")
        if d.seq_len < 2:
            raise MoepressError(f"--seq-len must be at least 2 (got {d.seq_len})")
        if d.seed < 0:
            raise MoepressError(f"--seed must be a non-negative integer (got {d.seed})")
        if self.batch_size < 1:
            raise MoepressError(f"--batch-size must be positive (got {self.batch_size})")
        device = resolve_device(self.device)
        resolve_dtype(self.dtype, device)
        if self.quantize is not None:
            from moepress.quant.export import check_quantize

            check_quantize(self.quantize, self.model)
        many = len(self.methods) > 1
        for k, entry in enumerate(self.methods):
            try:
                entry.check()
            except MoepressError as err:
                if not many:
                    raise
                raise MoepressError(f"methods[{k}] ({entry.method}): {err}") from None
        claimed: dict[int, int] = {}
        open_entries = [k for k, e in enumerate(self.methods) if e.layers is None]
        if len(open_entries) > 1:
            raise MoepressError(
                f"methods[{open_entries[0]}] and methods[{open_entries[1]}] both leave out layers:; "
                "only one entry may take every remaining layer"
            )
        for k, entry in enumerate(self.methods):
            for i in entry.layers or []:
                if i in claimed:
                    a, b = claimed[i], k
                    raise MoepressError(
                        f"layer {i} is claimed by methods[{a}] ({self.methods[a].method}) and methods[{b}] "
                        f"({entry.method}); a layer may be claimed by only one entry"
                    )
                claimed[i] = k
        check_data_path(self.data.path)

    def entry_layers(self, moe_ids: list[int]) -> list[list[int]]:
        """The MoE layers each entry may change, checked against the model's MoE layers."""
        moe = set(moe_ids)
        out: list[list[int]] = []
        for k, entry in enumerate(self.methods):
            if entry.layers is None:
                taken = {i for e in self.methods if e.layers for i in e.layers}
                layers = sorted(moe - taken)
                if not layers:
                    raise MoepressError(
                        f"methods[{k}] ({entry.method}) takes the remaining MoE layers, but the other "
                        "entries claim all of them"
                    )
            else:
                bad = [i for i in entry.layers if i not in moe]
                if bad:
                    raise MoepressError(
                        f"layers {format_layers(bad)} of {entry.method} are not MoE layers of the model "
                        f"(MoE layers: {format_layers(sorted(moe))})"
                    )
                layers = entry.layers
            if entry.num_layers is not None and entry.num_layers > len(layers):
                whole = entry.layers is None and len(self.methods) == 1
                what = "MoE layers" if whole else f"MoE layers ({format_layers(layers)}) to choose from"
                raise MoepressError(
                    f"--layers {entry.num_layers} is more than the model's {len(layers)} {what}; "
                    f"use --layers 1 to {len(layers)}"
                )
            out.append(layers)
        return out


def resolve_path(value: str, base: Path) -> str:
    """A recipe's relative path, resolved against the recipe's folder; hub names are kept as written."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if value.startswith((".", "~")) or candidate.exists():
        return str(candidate.resolve())
    return value


def check_data_path(data: str) -> None:
    from moepress.data.text import LOCAL_SUFFIXES

    p = Path(data)
    if p.suffix in LOCAL_SUFFIXES or p.exists():
        if not p.is_file():
            raise MoepressError(f"data file {p} does not exist; pass a .txt, .jsonl or .parquet file")
