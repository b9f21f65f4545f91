"""fedtune: federated fine-tuning simulations on Flower + Ray.

Compare aggregation strategies for fine-tuning pretrained models across clients
on accuracy *and* on the bytes they put on the wire.
"""

__version__ = "0.1.0"
