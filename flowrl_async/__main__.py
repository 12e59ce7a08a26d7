from flowrl_async.cli import main

main()
