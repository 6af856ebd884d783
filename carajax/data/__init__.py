"""Data files the package reads at run time, shipped inside it (so a wheel or a plain
`pip install .` finds them, not only a clone): the default cost models and the Azure LLM 2023
conversation trace that `carajax replay` and `carajax simulate` read by default.

They are copies of the repository's `data/cost_models/` (with their provenance in its README) and
`data/traces/azure_llm_2023/` (CC-BY 4.0: `traces/LICENSE_CC-BY-4.0.txt` and the attribution
`traces/AzureLLMInferenceDataset2023.md` ship with it); `tests/test_packaging.py` checks they stay
equal. So are the kernel tables (`data/kernel_tables/`): the record of the kernel forms verified
compiled per device kind (`verified.json`, `carajax.autotune`) and the measured per-device tables
(`<device>.json`, `carajax.lora.kernel_table`). The demo model ships in `carajax/demo/`.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
COST_MODELS = DATA_DIR / "cost_models"
CONV_TRACE = DATA_DIR / "traces" / "azure2023_conv.jsonl"
KERNEL_TABLES = DATA_DIR / "kernel_tables"
