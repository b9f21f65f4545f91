"""Flower adapters: the generic Strategy, the ServerApp and the ClientApp."""
