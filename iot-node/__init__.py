"""IoT node: the service that owns private data. node.py opens rounds (as coordinator), seals and
submits its data (as participant) and collects each round's global model; local_training.py
trains on its own data where a workflow says train_on "iot"; commitment.py is the salted
commitment that such a node submits instead of its data.
"""
