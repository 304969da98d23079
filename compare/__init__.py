"""Models, text, data budgets and the measurements that put local and global loss side by side."""

from .data import DataBudget, DataError, TextSplits, load_text, tokenize, wiki_articles
from .evaluate import EvalResult, eval_windows, evaluate_nll, token_nll
from .models import (EMBEDDED_MODELS, ModelError, cache_dir, load_model, prepare_embedded,
                     tiny_model)

__all__ = ["DataBudget", "DataError", "EMBEDDED_MODELS", "EvalResult", "ModelError", "TextSplits",
           "cache_dir", "eval_windows", "evaluate_nll", "load_model", "load_text",
           "prepare_embedded", "tiny_model", "token_nll", "tokenize", "wiki_articles"]
