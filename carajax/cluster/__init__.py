"""Scale out on Ray Serve: carajax replicas behind Ray's HTTP ingress, routed by our policies.

    routing.py     (no Ray needed) a replica's routing stats from its engine, WorkerStates from
                   those stats, and the ranking our Ray router hands Ray: the policy's choice first
    ray_router.py  CarajaxRequestRouter: Ray Serve's RequestRouter asking a carajax.sched policy
    app.py         the Serve application: CarajaxReplica (one Engine each) + the OpenAI ingress;
                   `build_app(...)`, and `app_builder` for `serve run deploy/carajax_serve.yaml`

Ray is an optional extra (`pip install carajax[ray]`); only routing.py imports without it.
"""
