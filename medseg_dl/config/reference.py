"""The params reference as Markdown, generated from the schema (schema.py)."""
import json

from medseg_dl.config.params import all_keys
from medseg_dl.config.schema import type_names


def _format(value):
    return "null" if value is None else json.dumps(value)


def params_reference():
    """A Markdown table: key, default, accepted values, meaning; one row per schema key."""
    rows = ["| key | default | accepted | meaning |", "|---|---|---|---|"]
    for dotted, key in all_keys():
        accepted = " / ".join(map(str, key.choices)) if key.choices else type_names(key.types)
        if key.items:
            accepted += f" of {type_names(key.items)}"
        if key.minimum is not None or key.maximum is not None:
            accepted += f" in [{'' if key.minimum is None else key.minimum}, " \
                        f"{'' if key.maximum is None else key.maximum}]"
        rows.append(f"| `{dotted}` | `{_format(key.default)}` | {accepted} | {key.doc} |")
    return "\n".join(rows)
