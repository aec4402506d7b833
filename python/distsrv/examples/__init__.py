"""Examples built on the distsrv API: the ``distsrv demo`` training job, its model and launcher."""
