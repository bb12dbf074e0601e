"""The FastStream application: the broker and its topology, settling deliveries, the
composition root and its HTTP server.
"""
