"""The LSTM encoder-decoder with MoE layers between LSTM layers."""

from nmt_moe.models.decoder import DecoderState, StepOutput
from nmt_moe.models.encoder import EncoderOutput
from nmt_moe.models.seq2seq import Seq2Seq, Seq2SeqConfig, Seq2SeqOutput, parameter_counts

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Seq2SeqOutput",
    "StepOutput",
    "parameter_counts",
]
