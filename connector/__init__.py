"""The connector: dials out to the cloud and delivers messages locally."""
