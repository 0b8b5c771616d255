"""The tests' helper library: the environment they run under (env), the servers they start
(servers) and the jobs they run (jobs).  Test files import it as ``support.<module>``: pytest puts
tests/ on sys.path for conftest.py and the test modules."""
