"""`trustmesh dashboard`: a read-only web view of workflows, rounds, nodes and the chain.

    views.py    what a page shows, read from the chain (REST API, one head at a time), Redis
                heartbeats and the local network's network.json; also `workflow list / show`
    charts.py   server-rendered SVG charts (no JavaScript library, nothing fetched at run time)
    pages.py    the HTML pages
    server.py   the aiohttp application: access tokens, JSON API under /api/, live updates
                (server-sent events from the validator's block events), audits cached by head
"""
