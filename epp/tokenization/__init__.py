"""Request tokenization for precise prefix-cache scoring: the token ids the engine will see.

``backends``  the simulator's built-in tokenizer, or a local Hugging Face tokenizer directory
              (``tokenizer.json`` + ``tokenizer_config.json`` chat template, rendered as vLLM does)
``cache``     a tokenization cache keyed by text prefix, so shared prefixes are tokenized once
``request``   OpenAI request body → token ids (completions prompt, chat messages); renders
              cached, large encodes on a bounded worker pool (``tokenize_async``)
``server``    ``tokenizer: model-server``: the model server's own ``POST /tokenize``
"""

from epp.tokenization.backends import BuiltinBackend, HFBackend, TokenizerBackend, load_backend
from epp.tokenization.cache import PrefixTokenCache
from epp.tokenization.request import RequestTokenizer
from epp.tokenization.server import SERVER_SPEC, ServerTokenizer

__all__ = ["SERVER_SPEC", "BuiltinBackend", "HFBackend", "PrefixTokenCache", "RequestTokenizer", "ServerTokenizer",
           "TokenizerBackend", "load_backend"]
