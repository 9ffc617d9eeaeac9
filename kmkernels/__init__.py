"""kmkernels: fused kernels for training and serving Knowledge Modules.

Every op has a Triton path (CUDA, or CPU under TRITON_INTERPRET=1) and a PyTorch path;
``backend="auto"`` picks Triton on CUDA and torch elsewhere.
"""
from .dcd import DCDLoss, dcd_loss
from .fused_linear_kl import FusedLinearKL, KLDivLogits, fused_linear_kl, kl_div_logits
from .hidden_l1 import HiddenL1, hidden_l1
from .kl_from_stats import FusedLinearKLFromStats, fused_linear_kl_from_stats, teacher_kl_stats
from .lora import (GroupedLoRALinear, adapter_targets, attach_grouped_lora, build_segments, export_peft, grouped_lora,
                   load_peft, lora_targets, read_adapter_config, reset_slot, set_adapter_ids, slot_parameters)
from .utils import free_cpu_scratch

__version__ = "0.1.0"

__all__ = [
    "DCDLoss", "dcd_loss",
    "FusedLinearKL", "KLDivLogits", "fused_linear_kl", "kl_div_logits",
    "HiddenL1", "hidden_l1",
    "FusedLinearKLFromStats", "fused_linear_kl_from_stats", "teacher_kl_stats",
    "GroupedLoRALinear", "attach_grouped_lora", "build_segments", "export_peft", "grouped_lora", "load_peft",
    "adapter_targets", "lora_targets", "read_adapter_config", "reset_slot", "set_adapter_ids", "slot_parameters",
    "free_cpu_scratch",
]
