"""Image synthesis from shared embeddings (X-MRS): a conditional GAN over a trained run.

:mod:`.gan` holds the generator and discriminator, :mod:`.train` the training loop
(frozen embeddings of a trained retrieval run as conditions; atomic, resumable
checkpoints), :mod:`.evaluate` the X-MRS check (synthesized images as retrieval queries)
and the comparison grid.
"""
from .gan import ConditionalGenerator, ProjectionDiscriminator
from .train import SynthesisConfig, load_synthesizer, synthesize, train_synthesis

__all__ = ["ConditionalGenerator", "ProjectionDiscriminator", "SynthesisConfig", "load_synthesizer",
           "synthesize", "train_synthesis"]
