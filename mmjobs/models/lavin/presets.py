"""The LaVIN schedule study's adapter-dropout rows (the seed fork's `--dropout_prob`,
`--dropout_var`, `--dropout_lim`), shared by the LaVIN adapters (`adapters.preset_dropouts`)
and LoRA's per-layer dropout (`mmjobs.train.dropout_schedules`): kept here, in the model's
package, so the model needs nothing from training.
"""

from __future__ import annotations

# Row name -> (`layer_dropout_values` kind, its arguments).
LAVIN_DROPOUT_PRESETS: dict[str, tuple[str, dict[str, float]]] = {
    "inc": ("increasing_geometric", {"p": 0.1, "factor": 1.01, "limit": 0.2}),
    "inc_v2": ("increasing_geometric", {"p": 0.1, "factor": 1.03, "limit": 0.2}),
    "dec": ("decreasing_geometric", {"p": 0.2, "factor": 0.99, "limit": 0.1}),
    "dec_v2": ("decreasing_geometric", {"p": 0.2, "factor": 0.97, "limit": 0.1}),
}
