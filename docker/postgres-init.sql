-- a second database for MLflow's backend store (the Airflow one is created by the image)
CREATE DATABASE mlflow;
