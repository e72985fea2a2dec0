from blip2.models.outputs import Blip2FeatureOutput, Blip2Output
from blip2.models.stage1 import Blip2Qformer

__all__ = ["Blip2Qformer", "Blip2Output", "Blip2FeatureOutput"]
