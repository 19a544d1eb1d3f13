"""Attribution graphs from a trace (numpy only): the local replacement model, sparse edges, pruning, export.

    g = build_graph(trace, transcoders, position=-1)     # unpruned Graph (model.py, attribute.py)
    g.prune(0.8, 0.98).to_neuronpedia()                   # circuit-tracer's pruning, Neuronpedia's JSON
"""

from .attribute import build_graph
from .graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from .transcoders import Transcoder, TranscoderSet, load_circuit_tracer, random_transcoders, save_circuit_tracer

__all__ = ["build_graph", "Graph", "FEATURE", "ERROR", "TOKEN", "LOGIT", "Transcoder", "TranscoderSet",
           "load_circuit_tracer", "random_transcoders", "save_circuit_tracer"]
