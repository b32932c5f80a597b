"""LoRA layers and adapter management (being written: see DESIGN.md for the contract)."""
from __future__ import annotations


class AdapterHost:
    """Mixin for Transformer: load_adapter / set_adapters / unload_adapter / adapters (see DESIGN.md)."""
