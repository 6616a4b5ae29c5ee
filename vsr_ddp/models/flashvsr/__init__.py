"""FlashVSR (OpenImagingLab/FlashVSR, Apache-2.0): a one-step distilled DiT on Wan 2.1 1.3B with a
causal low-quality projector, a streaming KV window and a tiny conditional decoder (issue 25).

vsr_ddp's own implementation, written from the original's code: ``sparse`` (the locality-constrained
block-sparse attention and its exact masked fallback), ``dit`` (the Wan DiT backbone as FlashVSR
runs it), ``decoder`` (the tiny conditional decoder and the LQ projector), ``vae`` (the Wan 2.1 VAE
decoder of the ``full`` mode), ``pipeline`` (the streaming inference on the temporal contract,
:class:`~.pipeline.FlashVSRTiny`, tiny or full mode): job=upscale runs it as
``job.model=flashvsr job.flashvsr.dir=FOLDER`` (``load_flashvsr``).
"""
