"""Checkpoints on disk: GPT-2 weights into a fastgpt ``GPTModel``, and back out.

``from_pretrained(path)`` reads

* a Hugging Face GPT-2 folder: ``config.json`` (``hf_config.py``) +
  ``model.safetensors`` or its shards listed in ``model.safetensors.index.json``
  (``safetensors_format.py``), or ``pytorch_model.bin`` (``torch_format.py``);
* OpenAI's TensorFlow release folder: ``hparams.json`` + ``model.ckpt.index`` +
  ``model.ckpt.data-*`` (``tensorflow_format.py``, no TensorFlow needed);
* one state-dict file, ``.safetensors`` or a ``torch.save`` file (``.pth``,
  ``.pt``, ``.bin``; a dict with ``model_state_dict`` as the seed's training
  code saves it is unwrapped), in fastgpt's (the seed's) layout or Hugging Face's.

``loading.py`` tells the formats apart and loads; ``layouts.py`` holds the name
mappings between the three layouts; ``files.py`` the ``CheckpointError`` every
problem raises and the safe file reading all formats share.
``save_pretrained(model, directory)`` (``saving.py``) writes ``config.json`` +
``model.safetensors`` in Hugging Face's GPT-2 layout, which
``transformers.GPT2LMHeadModel.from_pretrained`` and ``from_pretrained`` here
both read; the config records the weights' sha256, so the pair is one unit.
``names.py`` resolves a released GPT-2's name (``"gpt2"``, ``"124M"``, ...) to
a local folder: a path, the seed's ``models_dir``, the Hugging Face cache, and
a download only when asked.
"""

from .files import CheckpointError
from .loading import from_pretrained
from .saving import save_pretrained

__all__ = ["from_pretrained", "save_pretrained", "CheckpointError"]
