"""Evaluations of long-context attention: passkey retrieval, perplexity, reports.

``python -m msattn.eval passkey|perplexity|compare --help`` runs them from the command line.
"""

from .compare import format_compare, run_compare, write_compare
from .loading import Settings, load, method_names, prepare, save_checkpoint
from .passkey import PasskeyTokenizer, passkey_prompt, run_passkey, sample
from .perplexity import run_perplexity
from .report import format_report, format_table, plot, write_json, write_report

__all__ = ["PasskeyTokenizer", "Settings", "format_compare", "format_report", "format_table", "load",
           "method_names", "passkey_prompt", "plot", "prepare", "run_compare", "run_passkey", "run_perplexity", "sample",
           "save_checkpoint", "write_compare", "write_json", "write_report"]
