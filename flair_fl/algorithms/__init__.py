"""Federated algorithms: each algorithm's server half (and, where it has one, client half).

A server half implements `flair_fl.federated.contract.ServerStrategy` directly:
`fedopt.ServerOptimizer` (FedAdam as pfl-research runs it), `fedprox.AdaFedProx` (FedProx
whose mu adapts to the central val loss), `scaffold.Scaffold`. Flower's own strategies
(FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad) enter through the contract's
adapter instead.
"""
