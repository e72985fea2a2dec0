from blip2.models.outputs import Blip2FeatureOutput, Blip2Output, Blip2Stage2Output
from blip2.models.stage1 import Blip2Qformer
from blip2.models.stage2 import Blip2ImageToTextGeneration

__all__ = ["Blip2Qformer", "Blip2ImageToTextGeneration", "Blip2Output", "Blip2Stage2Output", "Blip2FeatureOutput"]
