"""VM monitoring: the poll loop and the push channel (``loop``), and how a host's report
becomes database rows (``sync``)."""
