"""Every Ray edge of soup-ray: starting Ray (``session``), the Tune sweep, its trainable, search space and
callback, the soup keeper and its actor, the actor's status, and the cluster dry run."""
