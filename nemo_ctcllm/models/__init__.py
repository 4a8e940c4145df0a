from nemo_ctcllm.models.ctc_llm_bpe import EncDecCTCLLMModelBPE

__all__ = ["EncDecCTCLLMModelBPE"]
