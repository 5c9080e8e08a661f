"""The general.name / organization / basename / finetune / version / size_label keys that
llama.cpp's converter derives from a model id such as "Qwen/Qwen2.5-0.5B-Instruct"
(gguf-py's Metadata.get_model_id_components, id_to_title and apply_metadata_heuristic, and
utility.size_label; notes section 1.4).

README front-matter and --metadata overrides are not read. Imports only the standard library.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Part annotations, tested in this order on each '-'-separated part (Metadata.get_model_id_components).
_VERSION = re.compile(r"(v|iter)?\d+([.]\d+)*", re.IGNORECASE)
_QUANT_TYPE = re.compile(r"i?q\d(_\w)*|b?fp?(16|32)", re.IGNORECASE)
_SIZE = re.compile(r"(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)", re.IGNORECASE)
_FINETUNE = re.compile(r"chat|instruct|vision|lora", re.IGNORECASE)


@dataclass(frozen=True)
class ModelId:
    name: str | None = None          # the part after the org, as given
    organization: str | None = None
    basename: str | None = None
    finetune: str | None = None
    version: str | None = None
    size_label: str | None = None


def id_to_title(s: str) -> str:
    """'qwen2.5-0.5b-instruct' -> 'Qwen2.5 0.5b Instruct' (gguf-py's Metadata.id_to_title)."""
    return " ".join(w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w) else w
                    for w in s.replace("-", " ").split())


def size_label(total_params: int) -> str:
    """Rounded parameter count, '135M', '1.5B' (gguf-py's utility.size_label, dense models)."""
    for limit, scale, suffix in ((1e12, 1e-12, "T"), (1e9, 1e-9, "B"), (1e6, 1e-6, "M")):
        if total_params > limit:
            break
    else:
        scale, suffix = 1e-3, "K"
    scaled = total_params * scale
    fix = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{fix}f}{suffix}"


def parse_model_id(model_id: str, total_params: int) -> ModelId:
    """Split a model id into name components as gguf-py's get_model_id_components does."""
    if " " in model_id:
        return ModelId(name=model_id)
    org, _, full = model_id.partition("/") if "/" in model_id else (None, "", model_id)
    if org is not None and org.startswith("."):
        org = None
    parts = [p for p in full.split("-") if p]
    kinds: list[set[str]] = [set() for _ in parts]
    for i, part in enumerate(parts):
        if _VERSION.fullmatch(part):
            kinds[i].add("version")
        elif _QUANT_TYPE.fullmatch(part):
            kinds[i].add("type")
            parts[i] = part.upper()
        elif i > 0 and _SIZE.fullmatch(part):
            part = part.replace("_", ".")
            if part[-1].isdecimal():  # bloom-7b1 -> 7.1b
                part = part[:-2] + "." + part[-1] + part[-2]
            if len(part) > 1 and part[-2].isdecimal() and part[-1] in "kmbt":
                part = part[:-1] + part[-1].upper()
            if total_params != 0:
                try:
                    label_params = float(part[:-1]) * pow(1000, " KMBT".find(part[-1]))
                    if abs(label_params - total_params) > 7 * total_params // 8:
                        kinds[i].add("finetune")  # most likely a context length ("8k")
                        part = part[:-1] + part[-1].lower()
                except ValueError:
                    pass
            if not kinds[i]:
                kinds[i].add("size_label")
            parts[i] = part
        elif i > 0 and _FINETUNE.fullmatch(part):
            kinds[i].add("finetune")
    # Word sizes ("small") give way to a numeric one.
    if any(c.isdecimal() for p, k in zip(parts, kinds) if "size_label" in k for c in p):
        for p, k in zip(parts, kinds):
            if "size_label" in k and all(c.isalpha() for c in p):
                k.remove("size_label")
    at_start = True
    for p, k in zip(parts, kinds):
        if at_start and ((not k and p[0].isalpha()) or "version" in k):
            k.add("basename")
        else:
            at_start = False
            if not k:
                k.add("finetune")
    for p, k in zip(reversed(parts), reversed(kinds)):  # a trailing version is not the basename
        if "basename" in k and len(k) > 1:
            k.remove("basename")
        else:
            break

    def joined(kind: str, exclude: str | None = None) -> str | None:
        picked = [p for p, k in zip(parts, kinds) if kind in k and (exclude is None or exclude not in k)]
        return "-".join(dict.fromkeys(picked) if kind == "size_label" else picked) or None

    basename, size, finetune = joined("basename"), joined("size_label"), joined("finetune")
    version = joined("version", exclude="basename")
    if size is None and finetune is None and version is None:
        basename = None
    return ModelId(full, org, basename, finetune, version, size)


def general_name_keys(name_or_path: object, dir_name: str, total_params: int,
                      experts: tuple[int, int] = (0, 0)) -> dict[str, str]:
    """general.* name keys in the order gguf-py writes them (Metadata.set_gguf_meta_model): config.json's
    `_name_or_path` (if it has at most one '/') first, then the directory name, each field
    taken from the first source that has it; size_label falls back to the parameter count,
    for an MoE to "{n}x{size}" (experts = (the parameters of one expert of each stack, n),
    gguf-py's GGUFWriter.get_total_parameter_count and utility.size_label)."""
    sources = []
    if isinstance(name_or_path, str) and name_or_path.count("/") <= 1:
        sources.append(parse_model_id(name_or_path, total_params))
    sources.append(parse_model_id(dir_name, total_params))
    fields: dict[str, str | None] = {}
    for field in ("name", "organization", "basename", "finetune", "version", "size_label"):
        fields[field] = next((getattr(s, field) for s in sources if getattr(s, field) is not None), None)
    name = id_to_title(fields["name"]) if fields["name"] is not None else dir_name
    org = id_to_title(fields["organization"]) if fields["organization"] is not None else None
    expert_params, n_expert = experts
    fallback = (f"{n_expert}x{size_label(total_params - n_expert * expert_params + expert_params)}" if n_expert
                else size_label(total_params))
    size = fields["size_label"] or (fallback if total_params > 0 else None)
    out = {"general.name": name, "general.version": fields["version"], "general.organization": org,
           "general.finetune": fields["finetune"], "general.basename": fields["basename"],
           "general.size_label": size}
    return {k: v for k, v in out.items() if v}  # gguf-py's add_string skips empty strings
