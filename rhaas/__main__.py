from rhaas.cli import main

main()
