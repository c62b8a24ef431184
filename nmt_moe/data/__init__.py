"""Data pipeline: sources -> cleaning -> SentencePiece -> cached encoded splits -> token-bucketed batches.

Import the Lightning-free parts from their modules; `TranslationDataModule` lives in `datamodule.py`
(importing it pulls in Lightning).
"""
