"""Built-in distillation methods; importing this package registers them in ``METHODS``.

========== ============================================================ =====================
name       what                                                         stages
========== ============================================================ =====================
finetune   hard labels only, no teacher (teacher fine-tuning)           task
kd         Hinton et al. 2015: KL on logits at temperature tau          task
tinybert   Jiao et al. 2020: embeddings/hidden/attention MSE, then      intermediate,
           soft cross-entropy on logits                                 prediction
minilm     Wang et al. 2020: last-layer attention + value-relation KL   task
theseus    Xu et al. 2020: progressive module replacing                 task
========== ============================================================ =====================
"""

from . import finetune, kd, minilm, theseus, tinybert  # noqa: F401  (registration)
from .finetune import Finetune
from .kd import KD
from .minilm import MiniLM
from .theseus import Theseus
from .tinybert import TinyBERT

__all__ = ["Finetune", "KD", "MiniLM", "Theseus", "TinyBERT"]
